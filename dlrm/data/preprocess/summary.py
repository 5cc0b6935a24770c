"""The run's summary (printed at the end, stored in meta.json): rows in, written, skipped and why."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dlrm.data import criteo_text as ct
from dlrm.data.preprocess.settings import Settings


def tally(s: Settings, records: list[list[dict]]) -> tuple[int, Counter, dict, int]:
    """Over a pass's chunk records: (rows read, rows skipped per reason, the first few
    `file:line` per reason (line numbers of the file, its header included), rows padded)."""
    skipped, bad, padded = Counter(), {}, 0
    for fi, recs in enumerate(records):
        line0 = 0
        for rec in recs:
            skipped.update(rec["skipped"])
            padded += rec["padded"]
            for reason, lines in rec["bad_lines"].items():
                kept = bad.setdefault(reason, [])
                kept += [f"{Path(s.inputs[fi]).name}:{line0 + n}" for n in lines][: max(0, ct.MAX_BAD_LINES - len(kept))]
            line0 += rec["lines"]
    rows_in = sum(r["rows_in"] for recs in records for r in recs)
    return rows_in, skipped, bad, padded


def make_summary(s: Settings, records, split_kind, split_rows, cardinalities, seconds, reused) -> dict:
    rows_in, skipped, bad, padded = tally(s, records)
    rows_written = sum(split_rows.values())
    if rows_written + sum(skipped.values()) != rows_in:  # nothing may vanish without a reason
        raise RuntimeError(f"rows do not add up: {rows_in} read, {rows_written} written, {dict(skipped)} skipped")
    return {
        "inputs": s.inputs,
        "formats": s.formats,
        "line_endings": s.eols,
        "headers": s.headers,
        "mode": s.mode,
        "min_count": s.min_count,
        "max_rows": s.max_rows,
        "split": split_kind,
        "rows_in": rows_in,
        "rows_written": split_rows,
        "rows_skipped": dict(skipped),
        "first_bad_lines": bad,
        "rows_padded": padded,
        "vocabulary": cardinalities,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "chunks_reused": reused,
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"rows in: {summary['rows_in']:,}",
        "rows written: " + ", ".join(f"{k} {v:,}" for k, v in summary["rows_written"].items()),
        "rows skipped: " + (", ".join(f"{k} {v:,}" for k, v in summary["rows_skipped"].items()) or "none"),
    ]
    for reason, where in summary["first_bad_lines"].items():
        lines.append(f"  {reason}: first at {', '.join(where)}")
    if summary["rows_padded"]:
        lines.append(f"rows padded (stripped trailing fields): {summary['rows_padded']:,}")
    lines.append("vocabulary: " + " ".join(f"{k}={v}" for k, v in summary["vocabulary"].items()))
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    if summary["rows_per_s"]:  # phases that read rows in this run (a resumed one may have reused all)
        lines.append("rows/s: " + ", ".join(f"{k} {v:,}" for k, v in summary["rows_per_s"].items()))
    return "\n".join(lines)


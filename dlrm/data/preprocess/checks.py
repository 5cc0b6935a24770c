"""Checks that refuse a run with one line: on the inputs and on what hash mode's counts need before
any work, and on the rows the first pass skipped before the rest of the work."""

from __future__ import annotations

import shutil
from pathlib import Path

from dlrm.data import criteo_text as ct
from dlrm.data.preprocess.settings import PreprocessError, Settings
from dlrm.data.preprocess.summary import tally
from dlrm.data.schema import SPARSE

GZIP_RATIO = 4  # Criteo text compresses about 3.5-4x; only for estimates (gzip keeps no reliable size)
MIN_ROW_BYTES = 40  # 39 separators + a label: no row of text is shorter (estimates of row counts)
MERGE_BYTES = 48  # per distinct id while merging one column's counts: keys, counts, sort order, copies
DENSE_COUNTS_MAX_ROWS = 1 << 20  # hash mode: counts/<C>.npy (8 MiB) up to this; sparse beyond
MAX_HASH_ROWS = 1 << 62  # hash ids are int64 (and computed modulo in uint64)


def inspect_inputs(paths: list[Path], fmt: str | None) -> tuple[list[str], list[str], list[bool], list[list[str]]]:
    """Per input: (format, line ending, has a header, column names). Raises InputError naming the
    file when it is missing, empty, unreadable, of unknown format or has no label column."""
    formats, eols, headers, names = [], [], [], []
    for p in paths:
        ct.check_input(p)
        f = fmt or ct.detect_format(p)
        eol = ct.detect_eol(p)
        header = ct.read_header(p, f, eol)
        ct.check_labeled(p, f, eol, header is not None)
        formats.append(f)
        eols.append(eol)
        headers.append(header is not None)
        names.append(header or ct.COLUMNS)
    return formats, eols, headers, names


def text_bytes(path: Path) -> int:
    """The input's size as text: exact for plain files, an estimate for gzip."""
    size = path.stat().st_size
    return size * GZIP_RATIO if ct.is_gzip(path) else size


def hash_counts_plan(s: Settings, out: Path, workers: int) -> int:
    """Hash mode: how many columns' counts to merge at once (memory grows with the distinct ids
    that occur, at most min(--max-rows, rows)). Raises PreprocessError, with the estimate, when
    even one column or the counts on disk cannot fit."""
    if s.max_rows > MAX_HASH_ROWS:
        raise PreprocessError(f"--max-rows {s.max_rows} is beyond {MAX_HASH_ROWS} (ids are int64)")
    rows = sum(text_bytes(Path(p)) for p in s.inputs) // MIN_ROW_BYTES  # at most this many rows
    distinct = min(s.max_rows - 1, rows)
    per_column = distinct * MERGE_BYTES
    disk = len(SPARSE) * (8 * s.max_rows if s.max_rows <= DENSE_COUNTS_MAX_ROWS else 16 * distinct)
    where = next(d for d in (out, *out.parents) if d.exists())  # --out itself is made only after the checks
    memory, free = available_memory(), shutil.disk_usage(where).free
    what = f"min(--max-rows {s.max_rows:,}, ~{rows:,} rows at most) = {distinct:,} distinct ids per column"
    if per_column > memory:
        raise PreprocessError(
            f"hash counts need ~{per_column / 2**30:.1f} GiB of memory per column ({what}), "
            f"{memory / 2**30:.1f} GiB available: use a smaller --max-rows or fewer inputs per run"
        )
    if disk > free:
        raise PreprocessError(f"hash counts need ~{disk / 2**30:.1f} GiB on disk ({what}), {free / 2**30:.1f} GiB free in {out}")
    return max(1, min(workers, len(SPARSE), memory // max(per_column, 1)))


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable, via psutil)."""
    import psutil

    return psutil.virtual_memory().available


def check_skips(s: Settings, records: list[list[dict]], max_bad_fraction: float) -> None:
    """After the first pass: refuse (PreprocessError, one line) when no row is left, or when more
    than `max_bad_fraction` of the rows read were skipped; the line gives the counts per reason and
    where each reason first occurs."""
    rows_in, skipped, bad, _ = tally(s, records)
    n_skipped = sum(skipped.values())
    reasons = ", ".join(f"{r} {n:,} (first at {bad[r][0]})" if bad.get(r) else f"{r} {n:,}" for r, n in skipped.most_common())
    if n_skipped >= rows_in:
        raise PreprocessError(f"no rows to write: all {rows_in:,} rows read were skipped: {reasons}")
    if n_skipped > max_bad_fraction * rows_in:
        raise PreprocessError(
            f"{n_skipped:,} of {rows_in:,} rows skipped ({n_skipped / rows_in:.1%}, more than --max-bad-fraction "
            f"{max_bad_fraction:g}): {reasons}; fix the input, or accept it with --max-bad-fraction "
            f"{_ceil_fraction(n_skipped / rows_in)} (the work done so far is kept and reused)"
        )


def _ceil_fraction(f: float) -> str:
    """A round fraction a little above f, to suggest on the command line."""
    for step in (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0):
        if f <= step:
            return f"{step:g}"
    return "1"

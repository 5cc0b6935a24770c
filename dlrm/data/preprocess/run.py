"""The whole run: check the inputs and --out, run the passes, assign splits, write meta.json last."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from dlrm.data import criteo_text as ct
from dlrm.data.preprocess.checks import DENSE_COUNTS_MAX_ROWS, check_skips, hash_counts_plan, inspect_inputs
from dlrm.data.preprocess.chunks import Job
from dlrm.data.preprocess.files import write_json
from dlrm.data.preprocess.passes import all_records, run_pass
from dlrm.data.preprocess.settings import COUNTS, PARTS, VOCAB, WORK, PreprocessError, Settings
from dlrm.data.preprocess.splits import assign_parts, day_of, describe_plan, plan_splits
from dlrm.data.preprocess.summary import format_summary, make_summary
from dlrm.data.preprocess.vocab import hash_counts, merge_column
from dlrm.data.preprocess.workers import Workers
from dlrm.data.schema import META_FILE, SPARSE, DatasetMeta

log = logging.getLogger(__name__)


def _fids(inputs: list[str]) -> list[str]:
    stems = [re.sub(r"(\.gz)?$", "", Path(p).name) for p in inputs]
    stems = [re.sub(r"\.(txt|csv|tsv)$", "", x) for x in stems]
    stems = [re.sub(r"[^A-Za-z0-9_.-]", "_", x) for x in stems]
    return stems if len(set(stems)) == len(stems) else [f"{i:03d}_{x}" for i, x in enumerate(stems)]


def _prepare_out(out: Path, settings: Settings, overwrite: bool) -> bool:
    """Make `out` ready; returns True when it already holds this exact finished dataset."""
    fingerprint = {"settings": asdict(settings), "input_sizes": [Path(p).stat().st_size for p in settings.inputs]}
    meta_path, work_cfg = out / META_FILE, out / WORK / "settings.json"
    if out.exists() and any(out.iterdir()):
        ours = work_cfg.exists() or (meta_path.exists() and "preprocess" in DatasetMeta.load(out).extra)
        if not ours:
            raise PreprocessError(f"{out}: exists, is not empty and is not a preprocessing output; choose another --out")
        if overwrite:
            for name in (WORK, PARTS, COUNTS, VOCAB):
                shutil.rmtree(out / name, ignore_errors=True)
            meta_path.unlink(missing_ok=True)
        elif meta_path.exists():
            prev = DatasetMeta.load(out).extra.get("preprocess", {}).get("fingerprint")
            if prev == fingerprint:
                return True
            raise PreprocessError(f"{out}: holds a dataset made with other settings or inputs; pass --overwrite or choose another --out")
        elif json.loads(work_cfg.read_text()) != fingerprint:
            raise PreprocessError(f"{out}: holds an unfinished run with other settings or inputs; pass --overwrite to start over")
    write_json(work_cfg, fingerprint)
    return False


def preprocess(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    fmt: str | None = None,
    mode: str = "vocab",
    min_count: int = 1,
    max_rows: int = 0,
    chunk_bytes: int = 64 << 20,
    row_group_rows: int = 65536,
    staging: bool = True,
    split: str = "auto",
    train_days: list[int] | None = None,
    val_days: list[int] | None = None,
    test_days: list[int] | None = None,
    workers: int = 1,
    strict: bool = False,
    max_bad_fraction: float = 0.01,
    overwrite: bool = False,
    keep_work: bool = False,
    progress: bool = True,
) -> dict:
    """Preprocess Criteo text files into a parquet dataset directory; returns the summary that is
    also stored in meta.json extra["preprocess"].

    Raises InputError (a bad input file, naming it and the line where there is one) or
    PreprocessError (bad options, an --out in the way, splits that leave train empty, hash counts
    that cannot fit, or more than `max_bad_fraction` of the rows skipped, none written); the checks
    on inputs, options and splits run before any work, the skip check right after the first pass.
    """
    t_start = time.perf_counter()
    paths = [Path(p).resolve() for p in inputs]
    if not paths:
        raise PreprocessError("no input files given")
    if all(re.search(r"day_\d+", p.name) for p in paths):  # day_10 after day_2, whatever the shell did
        paths.sort(key=lambda p: day_of(p.name, 0))
    if mode not in ("vocab", "hash"):
        raise PreprocessError(f"--mode must be vocab or hash, got {mode!r}")
    if mode == "hash" and max_rows < 2:
        raise PreprocessError("--mode hash needs --max-rows N (N >= 2: table rows, id 0 = missing)")
    if fmt is not None and fmt not in ct.FORMATS:
        raise PreprocessError(f"--format must be one of {ct.FORMATS}, got {fmt!r}")
    if min_count < 1 or chunk_bytes < 1 or row_group_rows < 1:
        raise PreprocessError("--min-count, --chunk-mb and --row-group-rows must be positive")
    if not 0 <= max_bad_fraction <= 1:
        raise PreprocessError(f"--max-bad-fraction must be within [0, 1], got {max_bad_fraction}")
    formats, eols, headers, names = inspect_inputs(paths, fmt)
    settings = Settings(
        inputs=[str(p) for p in paths], formats=formats, eols=eols, headers=headers, mode=mode, min_count=min_count, max_rows=max_rows,
        chunk_bytes=chunk_bytes, row_group_rows=row_group_rows, staging=staging and mode == "vocab", split=split,
        train_days=train_days, val_days=val_days, test_days=test_days,
    )  # fmt: skip
    plan = describe_plan(settings)  # fails on a bad split (e.g. no train day) before any work
    out = Path(out).resolve()
    merge_columns = hash_counts_plan(settings, out, workers) if mode == "hash" else workers
    out.mkdir(parents=True, exist_ok=True)
    if _prepare_out(out, settings, overwrite):
        meta = DatasetMeta.load(out)
        # A crash right after meta.json was written can leave sliced originals: not referenced.
        referenced = {f for files in meta.splits.values() for f in files}
        for part in (out / PARTS).glob("*.parquet"):
            if str(part.relative_to(out)) not in referenced:
                part.unlink()
        summary = meta.extra["preprocess"]
        if not keep_work:  # a crash between meta.json and this cleanup leaves .work behind
            shutil.rmtree(out / WORK, ignore_errors=True)
        if progress:
            print(f"{out}: already complete (same inputs and settings); nothing to do", file=sys.stderr)
        return summary
    fids = _fids(settings.inputs)
    if progress:
        print(plan, file=sys.stderr)
    pool = Workers(workers)
    try:
        summary = _run(out, settings, fids, names, pool, strict, max_bad_fraction, merge_columns, progress, t_start)
    finally:
        pool.close()
    if not keep_work:
        shutil.rmtree(out / WORK, ignore_errors=True)
    if progress:
        print(format_summary(summary), file=sys.stderr)
    return summary


def _run(out: Path, settings: Settings, fids, names, workers: Workers, strict: bool, max_bad_fraction: float,
         merge_columns: int, progress: bool, t_start: float) -> dict:  # fmt: skip
    paths = [Path(p) for p in settings.inputs]
    mode, min_count, max_rows = settings.mode, settings.min_count, settings.max_rows
    seconds, reused, done = {}, {}, {}

    if mode == "vocab":
        count = Job(str(out), "count", settings, fids, names, strict)
        with _phase(seconds, "count"):
            reused["count"], done["count"] = run_pass(count, workers, progress, "pass 1/2 count")
        count_recs = all_records(count)
        _check_not_empty(paths, count_recs)
        check_skips(settings, count_recs, max_bad_fraction)  # before the vocabulary and pass 2
        vocab_done = out / WORK / "vocab.json"
        with _phase(seconds, "vocab"):
            if not vocab_done.exists():
                files = [r["output"] for recs in count_recs for r in recs]
                rows = sum(r["rows"] for recs in count_recs for r in recs)
                args = [(str(out), ci, files, rows, min_count, max_rows) for ci in range(len(SPARSE))]
                sizes = workers.map(merge_column, args)
                write_json(vocab_done, dict(zip(SPARSE, sizes)))
        cardinalities = json.loads(vocab_done.read_text())

    encode = Job(str(out), "encode", settings, fids, names, strict)
    with _phase(seconds, "encode"):
        reused["encode"], done["encode"] = run_pass(encode, workers, progress, "pass 2/2 encode" if mode == "vocab" else "encode (hash)")
    records = all_records(encode)
    _check_not_empty(paths, records)
    if mode == "hash":
        check_skips(settings, records, max_bad_fraction)  # before the counts and meta.json
        with _phase(seconds, "counts"):
            files = [str(Path(WORK) / "encode" / fids[fi] / f"{k:06d}.arrow") for fi, recs in enumerate(records) for k in range(len(recs))]
            args = [(str(out), ci, files, max_rows, DENSE_COUNTS_MAX_ROWS) for ci in range(len(SPARSE))]
            sizes = []
            for i in range(0, len(args), merge_columns):  # as many columns at once as memory allows
                sizes += workers.map(hash_counts, args[i : i + merge_columns])
        cardinalities = dict(zip(SPARSE, sizes))

    # Splits, summary, meta.json (written last: its presence means the dataset is complete).
    log.info("start finalize")
    t = time.perf_counter()
    file_rows = [sum(r["rows"] for r in recs) for recs in records]
    split_kind, plan = plan_splits(settings, file_rows)
    splits, split_rows, sliced = assign_parts(out, records, plan, settings.row_group_rows)
    seconds["finalize"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    summary = make_summary(settings, records, split_kind, split_rows, cardinalities, seconds, reused)
    # Rates of this run's work only (a resumed run reads fewer rows than the dataset has).
    summary["rows_per_s"] = {k: round(n / seconds[k]) for k, n in done.items() if n and seconds[k] > 0}
    summary["fingerprint"] = json.loads((out / WORK / "settings.json").read_text())
    meta = DatasetMeta(
        cardinalities=cardinalities,
        splits=splits,
        rows=split_rows,
        multi_hot={},
        extra={
            "preprocess": summary,
            "counts_dir": COUNTS,
            # dense: counts/<C>.npy [rows]; sparse: counts/<C>.ids.npy + .counts.npy (vocab.load_counts)
            "counts_format": "sparse" if mode == "hash" and max_rows > DENSE_COUNTS_MAX_ROWS else "dense",
            "vocab_dir": VOCAB if mode == "vocab" else None,
        },
    )
    meta.save(out)
    for part in sliced:
        part.unlink(missing_ok=True)
    for tmp in (out / PARTS).glob(".*.tmp"):  # left by a crash mid-write; never referenced
        tmp.unlink()
    log.info("end finalize (%.1f s)", seconds["finalize"])
    return summary


@contextmanager
def _phase(seconds: dict, name: str):
    """Time a phase into seconds[name]; log its start and end (the benchmark listens)."""
    log.info("start %s", name)
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - t
        log.info("end %s (%.1f s)", name, seconds[name])


def _check_not_empty(paths: list[Path], records: list[list[dict]]) -> None:
    for p, recs in zip(paths, records):
        if sum(r["rows_in"] for r in recs) == 0:
            raise ct.InputError(f"{p}: empty input (no data lines)")

"""Command line: python -m dlrm.data.preprocess INPUTS --out DIR [options]."""

from __future__ import annotations

import argparse
import os
import sys

from dlrm.data import criteo_text as ct
from dlrm.data.preprocess.run import preprocess
from dlrm.data.preprocess.settings import PreprocessError

DESCRIPTION = "Criteo text (Kaggle train.txt, Terabyte day_N, plain or .gz) -> the parquet layout the loader reads."


def _days(text: str) -> list[int]:
    """'23' or '0-5,7' -> [23] or [0, 1, 2, 3, 4, 5, 7]."""
    days = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        days += list(range(int(lo), int(hi or lo) + 1))
    return days


DATASET_SPLITS = {"kaggle": "kaggle", "terabyte": "days"}  # --dataset, as in the reference DLRM


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dlrm.data.preprocess", description=DESCRIPTION)
    p.add_argument("inputs", nargs="+", help="Criteo text files: train.txt, day_0 .. day_23, plain or .gz")
    p.add_argument("--out", required=True, help="dataset directory (parquet parts, counts/, meta.json)")
    p.add_argument("--format", choices=ct.FORMATS, help="tsv (no header) or csv (Kaggle Id,Label header); default: detected")
    p.add_argument("--mode", choices=["vocab", "hash"], default="vocab", help="vocab: ids by frequency (2 passes); hash: 1 pass")
    p.add_argument("--min-count", type=int, default=1, help="vocab: values seen fewer times get id 0")
    p.add_argument("--max-rows", type=int, default=0, help="table rows cap: vocab keeps the N-1 most frequent; hash: N buckets")
    p.add_argument("--split", choices=["auto", "kaggle", "days", "none"], default="auto",
                   help="auto: kaggle for one input file, days for several")  # fmt: skip
    p.add_argument("--dataset", choices=list(DATASET_SPLITS),
                   help="name the dataset instead of --split: kaggle = --split kaggle, terabyte = --split days")  # fmt: skip
    p.add_argument("--train-days", type=_days, help="days (from day_N names, else input positions) for train, e.g. 0-22")
    p.add_argument("--val-days", type=_days, help="days for val (default: the last day; halved with test when both name it)")
    p.add_argument("--test-days", type=_days, help="days for test (default: the last day, first half)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="worker processes (default: CPU count)")
    p.add_argument("--chunk-mb", type=float, default=64, help="MB of text per chunk (unit of work and of restart)")
    p.add_argument("--row-group-rows", type=int, default=65536, help="parquet row group size")
    p.add_argument("--no-staging", action="store_true",
                   help="vocab mode: parse the text again in pass 2 instead of keeping pass 1's rows "
                   "(zstd, about 30%% of the text size) on disk until they are encoded")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail (after the first pass) when more than this fraction of the rows is skipped (default 0.01)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="discard an existing output or unfinished run in --out")
    p.add_argument("--keep-work", action="store_true", help="keep .work/ (manifest, per-chunk counts) after finishing")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dataset:
        if a.split not in ("auto", DATASET_SPLITS[a.dataset]):
            print(f"preprocess: error: --dataset {a.dataset} splits as {DATASET_SPLITS[a.dataset]}, not --split {a.split}", file=sys.stderr)
            return 2
        a.split = DATASET_SPLITS[a.dataset]
    try:
        preprocess(
            a.inputs, a.out, fmt=a.format, mode=a.mode, min_count=a.min_count, max_rows=a.max_rows,
            chunk_bytes=int(a.chunk_mb * (1 << 20)), row_group_rows=a.row_group_rows, staging=not a.no_staging, split=a.split,
            train_days=a.train_days, val_days=a.val_days, test_days=a.test_days, workers=a.workers,
            strict=a.strict, max_bad_fraction=a.max_bad_fraction, overwrite=a.overwrite, keep_work=a.keep_work, progress=not a.quiet,
        )  # fmt: skip
    except (ct.InputError, PreprocessError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    return 0


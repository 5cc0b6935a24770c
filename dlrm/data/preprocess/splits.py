"""Splits: which rows of which input go to train, val and test."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from dlrm.data.preprocess.files import write_parquet
from dlrm.data.preprocess.settings import PreprocessError, Settings

def day_of(path: str, position: int) -> int:
    m = re.search(r"day_(\d+)", Path(path).name)
    return int(m.group(1)) if m else position


def plan_splits(s: Settings, file_rows: list[int]) -> tuple[str, list[list[tuple[str, int, int]]]]:
    """Per input file: [(split, first row, end row)] in file order. Kaggle: the reference DLRM
    split (7 equal consecutive parts: 6 train, the 7th halved, first half test, second half val).
    Days: every file is a day; held-out days are halved the same way."""
    kind = s.split
    if kind == "auto":
        kind = "kaggle" if len(s.inputs) == 1 and not (s.val_days or s.test_days or s.train_days) else "days"
    if kind == "none":
        return kind, [[("train", 0, n)] for n in file_rows]
    if kind == "kaggle":
        total = sum(file_rows)
        per, extra = divmod(total, 7)
        sizes = [per + (1 if i < extra else 0) for i in range(7)]
        b6 = sum(sizes[:6])
        test_end = b6 + math.ceil(sizes[6] / 2)  # np.array_split puts the extra row first
        ranges = [("train", 0, b6), ("test", b6, test_end), ("val", test_end, total)]
        plan, start = [], 0
        for n in file_rows:  # intersect the global ranges with each file's rows
            plan.append([(sp, max(lo, start) - start, min(hi, start + n) - start) for sp, lo, hi in ranges if max(lo, start) < min(hi, start + n)])
            start += n
        return kind, plan
    if kind != "days":
        raise PreprocessError(f"--split must be auto, kaggle, days or none, got {kind!r}")
    days = [day_of(p, i) for i, p in enumerate(s.inputs)]
    if len(set(days)) != len(days):
        raise PreprocessError(f"two inputs are the same day: {days}")
    val = set(s.val_days if s.val_days is not None else ([] if s.test_days else [max(days)]))
    test = set(s.test_days if s.test_days is not None else ([] if s.val_days else [max(days)]))
    train = set(s.train_days) if s.train_days is not None else set(days) - val - test
    where = [[sp for sp, ds in (("train", train), ("test", test), ("val", val)) if d in ds] for d in days]
    if not any("train" in parts for parts in where):
        raise PreprocessError(
            f"--split days: no day is left for train ({describe_days(s.inputs, days, where)}): the last day is held "
            "out for test and val unless named otherwise; give more days (day_0 .. day_23), name them with "
            "--train-days/--val-days/--test-days, or cut the rows by position like Kaggle with --split kaggle "
            "(instead of --dataset terabyte)"
        )
    plan = []
    for p, d, n, parts in zip(s.inputs, days, file_rows, where):
        if not parts:
            raise PreprocessError(f"{p} (day {d}) is in no split: name it in --train-days/--val-days/--test-days")
        if parts == ["test", "val"]:
            half = math.ceil(n / 2)
            plan.append([("test", 0, half), ("val", half, n)])
        elif len(parts) == 1:
            plan.append([(parts[0], 0, n)])
        else:
            raise PreprocessError(f"{p} (day {d}) is in several splits {parts}; only val+test halves a day")
    return kind, plan


def assign_parts(out: Path, records: list[list[dict]], plan, row_group_rows: int):
    """Chunk outputs -> split file lists; a chunk that straddles a boundary is sliced into one file
    per split. Returns (splits, rows per split, sliced originals to delete once meta.json exists)."""
    splits, rows, sliced = {}, Counter(), []
    for recs, ranges in zip(records, plan):
        start = 0
        for rec in recs:
            n = rec["rows"]
            if n == 0:
                continue
            pieces = [(sp, max(lo, start) - start, min(hi, start + n) - start) for sp, lo, hi in ranges if max(lo, start) < min(hi, start + n)]
            part = out / rec["output"]
            if len(pieces) == 1:
                splits.setdefault(pieces[0][0], []).append(rec["output"])
            else:
                # The original is deleted only after meta.json is written, so it is still here
                # even when an earlier finalize was interrupted.
                table = pq.read_table(part)
                for sp, lo, hi in pieces:
                    piece = part.with_name(part.stem + f".{sp}.parquet")
                    write_parquet(piece, table.slice(lo, hi - lo), row_group_rows)
                    splits.setdefault(sp, []).append(str(piece.relative_to(out)))
                sliced.append(part)
            for sp, lo, hi in pieces:
                rows[sp] += hi - lo
            start += n
    return splits, dict(rows), sliced


def describe_days(inputs: list[str], days: list[int], where: list[list[str]]) -> str:
    """'day_0 (day 0) -> test+val' for every input, joined by '; ' (what went where)."""
    return "; ".join(f"{Path(p).name} (day {d}) -> {'+'.join(parts) or 'none'}" for p, d, parts in zip(inputs, days, where))


def describe_plan(s: Settings) -> str:
    """One line saying which input went to which split, before any work (file_rows unknown)."""
    kind, plan = plan_splits(s, [2] * len(s.inputs))  # 2 rows each: a halved day shows both halves
    if kind == "days":
        days = [day_of(p, i) for i, p in enumerate(s.inputs)]
        return "splits by day: " + describe_days(s.inputs, days, [[sp for sp, _, _ in ranges] for ranges in plan])
    if kind == "kaggle":
        return "splits by row position (the reference Kaggle split): 6/7 train, then 1/14 test, 1/14 val"
    return "split: none (every row in train)"

"""Checks on a dataset's ids before training, so a bad split fails in seconds, not after the run.

An id outside its table is found by the model only when a batch holding it is looked up: for the
eval split that is the final evaluation, after the whole run. `check_id_ranges` finds it first,
from each parquet row group's column statistics (min/max in the footer: no data read) or, for
files written without statistics, one pass over the split's id columns with pyarrow.

Example::

    check_id_ranges(loader, "val")   # ValueError naming split, feature, file and row group
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlrm.data.schema import SPARSE


def _stats_range(md: pq.FileMetaData, group: int, column: int) -> tuple[int, int] | None:
    """(min, max) of one column chunk from the footer, or None when not recorded."""
    stats = md.row_group(group).column(column).statistics
    if stats is None or not stats.has_min_max:
        return None
    return int(stats.min), int(stats.max)


def _read_range(pf: pq.ParquetFile, group: int, name: str) -> tuple[int, int] | None:
    """(min, max) of one id column of one row group, read from the data; None if it is empty."""
    col = pf.read_row_group(group, columns=[name]).column(name)
    if pa.types.is_list(col.type):
        col = pc.list_flatten(col)
    mm = pc.min_max(col)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return None if lo is None else (int(lo), int(hi))


def check_id_ranges(files: list[Path], rows: dict[str, int], split: str) -> None:
    """Raise ValueError (one line: split, feature, file, row group, the range found and the
    table's size) when an id of a feature in `rows` lies outside [0, rows[feature]).

    `files`: the split's parquet files; `rows`: feature -> table rows (features whose tables are
    folded at load time, `data.max_rows`, are left out by the caller: any id fits them).
    Cost: footers only when the files carry min/max statistics (pyarrow writes them by default),
    else one read of the id columns.
    """
    for f in files:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        leaves = {md.schema.column(i).path.split(".")[0]: i for i in range(md.num_columns)}
        for name in SPARSE:
            if name not in rows or name not in leaves:
                continue
            for g in range(md.num_row_groups):
                found = _stats_range(md, g, leaves[name])
                if found is None:
                    found = _read_range(pf, g, name)
                if found is None:
                    continue
                lo, hi = found
                if lo < 0 or hi >= rows[name]:
                    raise ValueError(
                        f"{split} split: feature {name} has ids in [{lo}, {hi}] in {f} (row group {g}), "
                        f"but its table has {rows[name]} rows (ids must be in [0, {rows[name]}), as "
                        f"meta.json says); was this split encoded with another vocabulary?"
                    )

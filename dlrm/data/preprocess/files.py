"""Writers of preprocessing outputs: each file appears whole or not at all (dlrm.io.atomic_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlrm.data.preprocess.settings import COUNT_SCHEMA
from dlrm.io import atomic_path, atomic_write_text


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:  # np.save appends .npy to any other name
        np.save(tmp, arr)


def write_parquet(path: Path, table: pa.Table, row_group_rows: int) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows)


def write_ipc(path: Path, table: pa.Table, compression: str | None) -> None:
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
            writer.write_table(table)


def write_counts(path: Path, batches: list[pa.RecordBatch]) -> None:
    """Per-chunk counts, one record batch per column (random access when merging).
    zstd: a chunk's counts shrink ~4x (to ~4% of its text) for ~0.04 s; Terabyte has ~17k chunks."""
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, COUNT_SCHEMA, options=options) as writer:
            for b in batches:
                writer.write_batch(b)

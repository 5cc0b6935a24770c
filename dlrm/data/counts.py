"""Per-id counts of a dataset's sparse features: `<dataset>/counts/<feature>.npy` (int64, index = id).

Preprocessing writes them (docs/data.md). A dataset without them (the built-in synthetic data, or
any parquet directory) gets them here, in one pass over its train split, written beside the
dataset with `dlrm.io.atomic_path` under a lock (parallel sweep jobs compute them once). Adding
them does not change a synthetic dataset's fingerprint: only its spec does.

Frequency-aware backends (emb=hybrid, emb=mde; emb=cached's warm start) read them through
`table_counts`, which folds them like the loader folds ids (`data.max_rows`: id % rows).

Example::

    counts = ensure_counts(Path("data/synthetic-4f1c..."))     # .../counts
    table_counts(counts, TableSpec("t_C3", 10_000, 16, ("C3",)))   # [10000] int64
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlrm.data.schema import SPARSE, DatasetMeta
from dlrm.io import atomic_path

log = logging.getLogger(__name__)

COUNTS = "counts"  # the directory name preprocessing uses too


def ensure_counts(path: Path, split: str = "train") -> Path:
    """The counts directory of the dataset at `path`, computed from its `split` first if absent.

    Uses meta.json's `extra.counts_dir` (preprocessed data) when it names a directory, else
    `<path>/counts`. Raises ValueError naming the split if the dataset has no such split."""
    path = Path(path)
    meta = DatasetMeta.load(path)
    given = meta.extra.get("counts_dir")
    out = path / (given or COUNTS)
    if _complete(out, meta):
        return out
    if split not in meta.splits:
        raise ValueError(f"{path}: no split {split!r} to count ids in (has {sorted(meta.splits)})")
    with open(path / f".{COUNTS}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(out, meta):
            return out
        log.info("counting ids of %s/%s (one pass) into %s", path, split, out)
        counts = {f: np.zeros(meta.cardinalities[f], dtype=np.int64) for f in SPARSE}
        for rel in meta.splits[split]:
            pf = pq.ParquetFile(path / rel)
            for g in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(g, columns=SPARSE)
                for f in SPARSE:
                    col = table.column(f).combine_chunks()
                    if pa.types.is_list(col.type):  # multi-hot: every id of every row counts
                        col = col.flatten()
                    ids = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)
                    counts[f] += np.bincount(ids, minlength=len(counts[f]))[: len(counts[f])]
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for f, c in counts.items():
                np.save(tmp / f"{f}.npy", c)
    return out


def _complete(directory: Path, meta: DatasetMeta) -> bool:
    return all((directory / f"{f}.npy").is_file() for f in meta.cardinalities)


def table_counts(directory: Path, table) -> np.ndarray:
    """Counts per row of `table` (a TableSpec): the sum over its features' count files, folded
    into `table.rows` rows (id % rows) when the files are longer (data.max_rows folds ids so).

    Raises ValueError naming the file if one is missing or shorter than the table."""
    total = np.zeros(table.rows, dtype=np.int64)
    for f in table.features:
        file = Path(directory) / f"{f}.npy"
        if not file.is_file():
            raise ValueError(f"{file}: no id counts for feature {f} (emb.counts / the dataset's counts/)")
        c = np.load(file, mmap_mode="r")
        if len(c) < table.rows:
            raise ValueError(f"{file}: {len(c)} counts, but table {table.name} has {table.rows} rows")
        if len(c) == table.rows:
            total += c
        else:
            total += np.bincount(np.arange(len(c)) % table.rows, weights=c, minlength=table.rows).astype(np.int64)
    return total

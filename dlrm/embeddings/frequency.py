"""Id frequencies for frequency-aware backends (hybrid, mde): which ids of a table are hot.

Counts come from `emb.counts` (a directory of `<feature>.npy`) or else from the run's dataset
(`Runtime.data_dir`, through `dlrm.data.counts.ensure_counts`, which computes them once from the
train split if the dataset has none). Only without either (a backend built outside a training run,
e.g. benchmarks) do we fall back to taking ids as frequency-ordered, which both the synthetic
generator and preprocessing guarantee (id 0 most frequent; docs/data.md), with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dlrm.data.counts import ensure_counts, table_counts
from dlrm.embeddings.base import Runtime, TableSpec

log = logging.getLogger(__name__)


def counts_source(counts_cfg, runtime: Runtime | None, backend: str) -> Path | None:
    """The directory of per-id counts for `backend`, or None (with a warning: ids are then taken
    as frequency-ordered)."""
    if counts_cfg:
        return Path(counts_cfg)
    if runtime is not None and runtime.data_dir is not None:
        return ensure_counts(Path(runtime.data_dir))
    log.warning(
        "emb=%s: no per-id counts (no emb.counts, no dataset): taking ids as frequency-ordered "
        "(id 0 most frequent, as synthetic and preprocessed data number them)", backend
    )
    return None


def frequency_order(table: TableSpec, directory: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids of `table` from most to least frequent [rows] int64, their counts [rows] float64).

    Ties keep id order (a stable sort). Without counts (`directory` None): ids in id order with
    Zipf(1) counts 1 / (id + 1), the prior that frequency-ordered ids imply."""
    if directory is None:
        ids = np.arange(table.rows, dtype=np.int64)
        return ids, 1.0 / (ids + 1.0)
    counts = table_counts(directory, table)
    order = np.argsort(-counts, kind="stable")
    return order.astype(np.int64), counts[order].astype(np.float64)

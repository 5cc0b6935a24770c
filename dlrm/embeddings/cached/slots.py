"""The cache's bookkeeping: which id sits in which slot, per-slot policy scores, cache sizes, and
the warm start (which ids to cache first, and the counts that seed LFU)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from dlrm.embeddings.base import TableSpec

POLICIES = ("lfu", "lru")
WARM_STARTS = ("auto", "counts", "ids", "none")
STORE_KINDS = ("host", "disk", "tt")  # emb.store; cached/__init__.py maps each to its cache


class TableSlots:
    """One table's cache map: id->slot ([rows] int32, -1 = not cached), slot->id ([capacity]
    int64, -1 = free) and a float64 policy score per slot (LFU: uses, LRU: last step)."""

    def __init__(self, table: TableSpec, capacity: int, prior: np.ndarray | None) -> None:
        self.table = table
        self.slot_of = torch.full((table.rows,), -1, dtype=torch.int32)
        self.prior = prior  # warm-start counts per id (maybe a read-only memmap), or None
        self.reset(capacity)

    def reset(self, capacity: int) -> None:
        self.capacity = capacity
        self.id_of = torch.full((capacity,), -1, dtype=torch.int64)
        self.score = torch.zeros(capacity, dtype=torch.float64)

    def map_bytes(self) -> int:
        return self.slot_of.numel() * 4 + self.id_of.numel() * 8 + self.score.numel() * 8

    def prior_of(self, ids: torch.Tensor) -> torch.Tensor:
        if self.prior is None:
            return torch.zeros(len(ids), dtype=torch.float64)
        return torch.from_numpy(np.asarray(self.prior[ids.numpy()], dtype=np.float64))


def cache_sizes(tables: list[TableSpec], cache_rows: int | None, cache_fraction: float | None) -> dict[str, int]:
    """Cache rows per table from emb.cache_rows (wins) or emb.cache_fraction; a cache larger than
    its table shrinks to the table (with a warning). Raises ValueError naming the key."""
    sizes = {}
    for t in tables:
        if t.rows <= 0:
            raise ValueError(f"emb=cached: table {t.name} has {t.rows} rows; it needs at least 1")
        if cache_rows is not None:
            n = int(cache_rows)
            if n <= 0:
                raise ValueError(f"emb.cache_rows={cache_rows}: must be >= 1 (or null to use cache_fraction)")
        elif cache_fraction is not None:
            if not 0 < float(cache_fraction) <= 1:
                raise ValueError(f"emb.cache_fraction={cache_fraction}: must be in (0, 1]")
            n = max(1, math.ceil(float(cache_fraction) * t.rows))
        else:
            raise ValueError("emb=cached: set emb.cache_rows or emb.cache_fraction")
        if n > t.rows:
            warnings.warn(
                f"emb.cache_rows={n} exceeds table {t.name}'s {t.rows} rows; using {t.rows}",
                stacklevel=3,
            )
            n = t.rows
        sizes[t.name] = n
    return sizes


def warm_start(
    tables: list[TableSpec], caps: dict[str, int], warm: str, counts_dir: str | None
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """(prior counts per table, ids to prefill per table) for `emb.warm_start`:

    - `counts`: the top ids of `counts_dir/<feature>.npy` (summed over a table's features), whose
      counts also seed LFU; `ids`: ids 0..cap-1 (ids numbered by descending frequency, as in the
      synthetic and preprocessed data); `none`: nothing; `auto`: counts if `counts_dir`, else ids.
    """
    if warm == "auto":
        warm = "counts" if counts_dir else "ids"
    priors, ranking = {}, {}
    if warm == "none":
        return priors, ranking
    for t in tables:
        cap = caps[t.name]
        if warm == "ids":
            ranking[t.name] = torch.arange(cap)
            continue
        if not counts_dir:
            raise ValueError("emb.warm_start=counts needs emb.counts (a dir of <feature>.npy)")
        files = [Path(counts_dir) / f"{f}.npy" for f in t.features]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"emb.counts={counts_dir!r}: missing count files {missing}")
        counts = np.load(files[0], mmap_mode="r")
        for f in files[1:]:
            counts = counts + np.load(f, mmap_mode="r")
        if counts.shape != (t.rows,):
            raise ValueError(f"emb.counts: {files[0]} has shape {counts.shape}, table {t.name} has {t.rows} rows")
        priors[t.name] = counts
        top = np.argpartition(-np.asarray(counts), cap - 1)[:cap] if cap < t.rows else np.arange(t.rows)
        ranking[t.name] = torch.from_numpy(np.sort(top).astype(np.int64))
    return priors, ranking

"""Backends that are an id transform in front of plain fbgemm tables (hashed, qr).

Such a backend changes only which rows ids reach: `remap(features)` turns the batch's ids into
rows of its own plain tables (`physical_tables`, one TBE from tables.py), and the lookup is an
ordinary fused lookup. Kept in this shape so that one table collection (the physical tables) can
later be handed to torchrec's sharding planner with the transform run in front of it.

Also here: what both of them share (the `compression` knob, per-table overrides, collision stats).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping

import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import EmbeddingBackend, TableSpec
from dlrm.embeddings.policy import POLICY_OPTIONS, resolve_table
from dlrm.options import Opt
from dlrm.embeddings.tables import fused_tables, tbe_bytes

log = logging.getLogger(__name__)


class RemappedTables(EmbeddingBackend):
    """Plain fused tables (`physical_tables`) behind an id transform (`remap`).

    Subclasses set `self.physical_tables` and call `build_tables(optim, pooling, device)`, then
    implement `remap`; `forward` is a fused lookup of the remapped ids unless they combine rows.
    """

    physical_tables: list[TableSpec]

    def build_tables(
        self, optim: DictConfig, pooling: str, device: torch.device, precision: str = "fp32"
    ) -> None:
        self.tbe = fused_tables(self.physical_tables, optim, pooling, device, precision)

    @abstractmethod
    def remap(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, offsets): key-major int64 rows of `physical_tables` for the ids of `features`
        (keys = self.features) and the bag offsets of the TBE lookup."""

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.tbe(*self.remap(features))
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=pooled)

    def embedding_bytes(self) -> int:
        return tbe_bytes(self.tbe)


# The keys hashed and qr share: the policy's, and rows per compressed row.
REMAP_OPTIONS: dict[str, Opt] = {**POLICY_OPTIONS, "compression": Opt(float, min=1)}


def table_overrides(given, key: str, tables: list[TableSpec], minimum: int = 1) -> dict[str, int]:
    """Per-table integer overrides `emb.<key>: {feature: n}` (e.g. emb.buckets), keyed by table name.

    Values must be integers >= `minimum` (error otherwise; emb.hot_rows of hybrid may be 0). Names that are none of `tables` are only
    logged: the policy may have kept that table full (below `emb.min_rows`), which is not an error.
    """
    given = given or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"emb.{key}={given!r}: must be a mapping {{feature: count}}, e.g. {{C3: 100000}}")
    out: dict[str, int] = {}
    for name, n in given.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"emb.{key}.{name}={n!r}: must be {what}")
        t = resolve_table(str(name), tables, f"emb.{key}.{name}")
        if t is not None:
            out[t.name] = n
        else:
            log.warning("emb.%s.%s: no compressed table or feature of that name; ignored", key, name)
    return out


def collision_stats(ids: torch.Tensor, rows: torch.Tensor) -> tuple[int, int, int]:
    """(distinct ids, distinct ids sharing their row with another distinct id, distinct rows).

    `ids` and `rows` are one table's lookups and the rows they hit; a repeated id is one id.

    >>> collision_stats(torch.tensor([5, 5, 6, 7]), torch.tensor([2, 2, 2, 3]))
    (3, 2, 2)
    """
    distinct, inverse = torch.unique(ids, return_inverse=True)
    # Row of each distinct id: any of its lookups will do, all hit the same row.
    row_of = torch.empty(len(distinct), dtype=rows.dtype, device=rows.device).scatter_(0, inverse, rows)
    used, which, counts = torch.unique(row_of, return_inverse=True, return_counts=True)
    return len(distinct), int((counts[which] > 1).sum()), len(used)


def rates(distinct: int, collided: int, touched: int, suffix: str = "") -> dict[str, float]:
    """The stats keys of `collision_stats` totals: collision_rate<suffix>, rows_touched<suffix>."""
    return {f"collision_rate{suffix}": collided / max(distinct, 1), f"rows_touched{suffix}": float(touched)}

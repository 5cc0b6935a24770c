"""`emb=hashed`: the hashing trick. Each compressed table's ids go through a seeded universal hash
into `buckets = ceil(rows / compression)` rows of an ordinary fbgemm table (fused SGD / Adagrad,
exactly as `emb=full`), so ids that land in one bucket share an embedding.

The hash (Carter-Wegman "vector multiply" over the prime field Z_p, p = 2^32 - 5) is exact in
int64 for *any* int64 id, including ids far beyond the declared table size:

    x = x0 + x1 * 2^30 + x2 * 2^60          (x0, x1 < 2^30; x2 < 16: the id's 64 bits, sign too)
    h(x) = ((a0*x0 mod p + a1*x1 mod p + a2*x2 mod p + b) mod p) mod buckets

Every product is below 2^32 * 2^30 = 2^62 and the sum of four reduced terms below 2^34, so nothing
overflows. The limbs are < p, so for ids x != y the limb vectors differ and, for (a0, a1, a2, b)
uniform in Z_p, Pr[h(x) = h(y)] <= 1/buckets + 1/p: a universal family, unlike a bare `id % buckets`
(which maps every id in an arithmetic progression onto one row). A plain `(a*x + b) mod p` would
overflow int64 once x >= 2^31; reducing x mod p first would make x and x + p collide surely.

Coefficients come from numpy's PCG64 seeded with (emb.hash_seed, crc32(table name)): the same in
every process and on every platform, different per table.

This module also holds what `emb=qr` (qr.py) shares: per-table overrides and collision stats.

Example::

    tables = [TableSpec("t_C3", rows=1_000_000, dim=16, features=("C3",))]
    emb = HashedEmbeddings(tables, OmegaConf.create({"compression": 16}), sparse_optim, cpu)
    emb.buckets                     # [62500]
    emb(kjt)["C3"].shape            # [B, 16]
    emb.stats()                     # {"collision_rate": ..., "rows_touched": ...} of the last batch
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping

import numpy as np
import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import EmbeddingBackend, TableSpec
from dlrm.embeddings.full import fused_tables, tbe_bytes
from dlrm.embeddings.registry import register

log = logging.getLogger(__name__)

PRIME = 4_294_967_291  # 2^32 - 5, the largest prime below 2^32
LIMB_BITS = 30
LIMB_MASK = (1 << LIMB_BITS) - 1


def hash_coefficients(seed: int, table: str) -> list[int]:
    """(a0, a1, a2, b), uniform in [0, PRIME), fixed by `seed` and the table's name.

    >>> hash_coefficients(0, "t_C3") == hash_coefficients(0, "t_C3")
    True
    """
    rng = np.random.default_rng([int(seed), zlib.crc32(table.encode())])
    return [int(c) for c in rng.integers(0, PRIME, size=4)]


def universal_hash(ids: torch.Tensor, coeffs: torch.Tensor, buckets: torch.Tensor | int) -> torch.Tensor:
    """Rows in [0, buckets) for int64 `ids`; `coeffs` is [..., 4] (a0, a1, a2, b), broadcast to ids.

    >>> universal_hash(torch.tensor([0, 1, 2**40]), torch.tensor([5, 7, 11, 3]), 10).tolist()
    [3, 8, 1]

    (2^40 has limbs (0, 2^10, 0): 7 * 1024 + 3 = 7171, and 7171 mod 10 = 1.)
    """
    a0, a1, a2, b = coeffs.unbind(-1)
    x0 = ids & LIMB_MASK
    x1 = (ids >> LIMB_BITS) & LIMB_MASK
    x2 = (ids >> (2 * LIMB_BITS)) & 0xF  # arithmetic shift; the mask keeps the top 4 bits as-is
    h = (a0 * x0) % PRIME + (a1 * x1) % PRIME + (a2 * x2) % PRIME + b
    return (h % PRIME) % buckets


def check_compression(cfg: DictConfig) -> float:
    """`emb.compression` as a float >= 1, or a one-line error naming it."""
    c = cfg.get("compression", 16)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 1:
        raise ValueError(f"emb.compression={c!r}: must be a number >= 1 (rows per compressed row)")
    return float(c)


def table_overrides(cfg: DictConfig, key: str, tables: list[TableSpec]) -> dict[str, int]:
    """Per-table integer overrides `emb.<key>: {table or feature name: n}`, keyed by table name.

    Values must be positive integers (error otherwise). Names that are none of `tables` are only
    logged: the registry may have kept that table full (below `emb.min_rows`), which is not an error.
    """
    given = cfg.get(key) or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"emb.{key}={given!r}: must be a mapping {{table: count}}, e.g. {{t_C3: 100000}}")
    by_name = {t.name: t for t in tables} | {f: t for t in tables for f in t.features}
    out: dict[str, int] = {}
    for name, n in given.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"emb.{key}.{name}={n!r}: must be a positive integer")
        if name in by_name:
            out[by_name[name].name] = n
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


def per_table(tables: list[TableSpec], length_per_key: list[int], *tensors: torch.Tensor):
    """Yield (index, table, slices of `tensors`) per table: a table's features are consecutive keys,
    so its lookups are one contiguous run of the key-major values."""
    sizes, k = [], 0
    for t in tables:
        sizes.append(sum(length_per_key[k : k + len(t.features)]))
        k += len(t.features)
    for i, (t, *parts) in enumerate(zip(tables, *(x.split(sizes) for x in tensors))):
        yield i, t, parts


def rates(distinct: int, collided: int, touched: int, suffix: str = "") -> dict[str, float]:
    return {f"collision_rate{suffix}": collided / max(distinct, 1), f"rows_touched{suffix}": float(touched)}


class HashedEmbeddings(EmbeddingBackend):
    """Hashing trick: ids hashed into `ceil(rows / compression)` rows (or `emb.buckets[table]`)."""

    name = "hashed"

    def __init__(
        self, tables: list[TableSpec], cfg: DictConfig, optim: DictConfig, device: torch.device
    ) -> None:
        super().__init__(tables)
        compression = check_compression(cfg)
        overrides = table_overrides(cfg, "buckets", self.tables)
        self.buckets = [overrides.get(t.name, math.ceil(t.rows / compression)) for t in self.tables]
        seed = cfg.get("hash_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"emb.hash_seed={seed!r}: must be an integer >= 0")
        hashed = [
            TableSpec(t.name, rows=n, dim=t.dim, features=t.features)
            for t, n in zip(self.tables, self.buckets)
        ]
        self.tbe = fused_tables(hashed, optim, cfg.get("pooling", "sum"), device)
        table_of_feature = [i for i, t in enumerate(self.tables) for _ in t.features]
        coeffs = torch.tensor(
            [hash_coefficients(seed, t.name) + [n] for t, n in zip(self.tables, self.buckets)],
            dtype=torch.int64,
        )
        # Per feature: (a0, a1, a2, b, buckets); part of the state so a checkpoint carries its hash.
        self.register_buffer("hash_params", coeffs[table_of_feature].to(device))
        self.per_table_stats = cfg.get("stats_per_table", False)
        self._last: tuple[torch.Tensor, list[int], torch.Tensor] | None = None

    def hash(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The bucket of every id in `features` (keys = self.features), in value order."""
        lengths = features.length_per_key()
        values = features.values()
        params = self.hash_params
        if len(set(lengths)) == 1:  # e.g. single-hot: broadcast per feature, no per-id copy
            per_id = params.unsqueeze(1)
            ids = values.view(len(lengths), -1)
        else:
            per_id = params.repeat_interleave(
                torch.tensor(lengths, device=values.device), dim=0, output_size=values.numel()
            )
            ids = values
        return universal_hash(ids, per_id[..., :4], per_id[..., 4]).reshape(-1)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        rows = self.hash(features)
        # Stats are computed lazily from these references, only when the trainer asks; they
        # describe the last training batch (results.json is written after the final eval).
        if self.training:
            self._last = (features.values(), features.length_per_key(), rows)
        pooled = self.tbe(rows, features.offsets())
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=pooled)

    def embedding_bytes(self) -> int:
        return tbe_bytes(self.tbe)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Of the last training batch: collision_rate (share of its distinct ids that share a bucket with
        another of its distinct ids) and rows_touched (distinct buckets used), over all hashed
        tables; per table too (collision_rate/<table>, ...) with emb.stats_per_table=true.

        One torch.unique per table over the batch's ids, only when the trainer asks (log steps).
        """
        if self._last is None:
            return {}
        values, lengths, rows = self._last
        total, out = [0, 0, 0], {}
        for _, t, (ids, hit) in per_table(self.tables, lengths, values, rows):
            counts = collision_stats(ids, hit)
            total = [a + c for a, c in zip(total, counts)]
            if self.per_table_stats:
                out |= rates(*counts, suffix=f"/{t.name}")
        return rates(*total) | out

    def describe(self) -> str:
        return "\n".join(
            f"{t.name}: hashed {t.rows} -> {n} x {t.dim} ({t.rows / n:.1f}x)"
            for t, n in zip(self.tables, self.buckets)
        )


register("hashed", HashedEmbeddings)

# emb=qr lives in qr.py and shares the helpers above; importing it here registers it, because the
# registry imports only this module of the two.
from dlrm.embeddings import qr  # noqa: E402, F401

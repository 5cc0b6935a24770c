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

The hash is an id transform (`remap`) in front of one plain fbgemm table per compressed table
(remap.py), the shape torchrec's sharding planner can take.

Example::

    tables = [TableSpec("t_C3", rows=1_000_000, dim=16, features=("C3",))]
    emb = HashedEmbeddings(tables, OmegaConf.create({"compression": 16}), sparse_optim, cpu)
    emb.buckets                     # [62500]
    emb(kjt)["C3"].shape            # [B, 16]
    emb.stats()                     # {"collision_rate": ..., "rows_touched": ...} of the last batch
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings.base import Runtime, TableSpec, per_table
from dlrm.embeddings.remap import REMAP_OPTIONS, RemappedTables, collision_stats, rates, table_overrides
from dlrm.options import Opt

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


class HashedEmbeddings(RemappedTables):
    """Hashing trick: ids hashed into `ceil(rows / compression)` rows (or `emb.buckets[feature]`)."""

    name = "hashed"
    options = {
        **REMAP_OPTIONS,
        "buckets": Opt(dict, nullable=True),
        "hash_seed": Opt(int, min=0),
        "stats_per_table": Opt(bool),
    }

    def __init__(
        self,
        tables: list[TableSpec],
        cfg: DictConfig,
        optim: DictConfig,
        device: torch.device,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(tables)
        cfg = self.settings(cfg)
        overrides = table_overrides(cfg.buckets, "buckets", self.tables)
        self.buckets = [overrides.get(t.name, math.ceil(t.rows / cfg.compression)) for t in self.tables]
        seed = cfg.hash_seed
        self.physical_tables = [
            TableSpec(t.name, rows=n, dim=t.dim, features=t.features)
            for t, n in zip(self.tables, self.buckets)
        ]
        self.build_tables(optim, cfg.pooling, device, cfg.weights_precision)
        table_of_feature = [i for i, t in enumerate(self.tables) for _ in t.features]
        coeffs = torch.tensor(
            [hash_coefficients(seed, t.name) + [n] for t, n in zip(self.tables, self.buckets)],
            dtype=torch.int64,
        )
        # Per feature: (a0, a1, a2, b, buckets); part of the state so a checkpoint carries its hash.
        self.register_buffer("hash_params", coeffs[table_of_feature].to(device))
        self.per_table_stats = cfg.stats_per_table
        self._last: tuple[KeyedJaggedTensor, torch.Tensor] | None = None

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

    def remap(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.hash(features)
        # Stats are computed lazily from these references, only when the trainer asks; they
        # describe the last training batch (results.json is written after the final eval).
        if self.training:
            self._last = (features, rows)
        return rows, features.offsets()

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Of the last training batch: collision_rate (share of its distinct ids that share a bucket with
        another of its distinct ids) and rows_touched (distinct buckets used), over all hashed
        tables; per table too (collision_rate/<table>, ...) with emb.stats_per_table=true.

        One torch.unique per table over the batch's ids, only when the trainer asks (log steps).
        """
        if self._last is None:
            return {}
        features, rows = self._last
        hit = KeyedJaggedTensor(
            keys=features.keys(), values=rows, offsets=features.offsets(), stride=features.stride()
        )
        total, out = [0, 0, 0], {}
        for (t, ids, _), (_, rows_of_t, _) in zip(per_table(self.tables, features), per_table(self.tables, hit)):
            counts = collision_stats(ids, rows_of_t)
            total = [a + c for a, c in zip(total, counts)]
            if self.per_table_stats:
                out |= rates(*counts, suffix=f"/{t.name}")
        return rates(*total) | out

    def describe(self) -> str:
        return "\n".join(
            f"{t.name}: hashed {t.rows} -> {n} x {t.dim} ({t.rows / n:.1f}x)"
            for t, n in zip(self.tables, self.buckets)
        )

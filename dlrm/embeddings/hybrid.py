"""`emb=hybrid`: frequency-aware embeddings. The most frequent ids of each table keep exact rows;
the rest share hashed rows.

The idea behind CAFE (Zhang et al., "CAFE: Towards Compact, Adaptive, and Fast Embedding for
Large-scale Recommendation Models", SIGMOD 2024) and the frequency-aware / deduplication methods
that win the experimental study of Zhang et al., "Experimental Analysis of Large-scale Learnable
Vector Storage Compression", VLDB 2024 (arXiv 2311.15578): under a memory budget, a few hot ids
carry most lookups, so they get their own rows and only the long tail shares. CAFE finds hot ids
online with a sketch; we take them from per-id counts (frequency.py), as the study's offline
variants do.

Per compressed table with `rows` ids: R = ceil(rows / compression) physical rows (or
`emb.hot_rows` + `emb.buckets`), of which H = floor(hot_share * R) hold the H most frequent ids
exactly and B = R - H >= 1 are hash buckets (the universal hash of emb=hashed) for every other id:

    row(x) = rank of x among the hot ids      if x is hot   (a binary search)
             H + hash(x) mod B                otherwise

Under `emb.budget`, `emb.allocation` says how H and B are chosen (dlrm/embeddings/budget.py):
`table` gives every compressed table the same share of its rows (tables under `emb.min_rows`
stay full); `global` sets one count threshold over every table's ids, as CAFE's global hot
threshold: the ids seen at least that often get exact rows wherever they are, and each table adds
B = ceil(H (1 - hot_share) / hot_share) hashed rows (docs/results.md: at 1000x on the synthetic
data it keeps 86% of lookups on exact rows, against 77%, and loses 0.0023 AUC, against 0.0154).

The hot ids are one sorted int64 buffer (8 bytes per hot id, counted in `embedding_bytes`), keyed
by table (table index * 2^40 + id), so one `searchsorted` serves every feature. The rows are one
plain fbgemm TBE (remap.py), updated fused as emb=full. Ids must be in [0, rows).

Example::

    emb = HybridEmbeddings([TableSpec("t_C3", 1_000_000, 16, ("C3",))],
                           OmegaConf.create({"compression": 16}), sparse_optim, cpu, runtime)
    emb.hot, emb.buckets            # [31250], [31250]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings.base import Runtime, TableSpec, check_ids_in_range, per_table
from dlrm.embeddings.frequency import counts_source, frequency_order
from dlrm.embeddings.hashed import hash_coefficients, universal_hash
from dlrm.embeddings.remap import (
    REMAP_OPTIONS,
    RemappedTables,
    collision_stats,
    rates,
    table_overrides,
)
from dlrm.options import Opt

KEY_BITS = 40  # hot ids are keyed table_index << 40 | id: tables up to 2^40 rows


def hybrid_sizes(rows: int, physical: int, hot_share: float) -> tuple[int, int]:
    """(hot rows H, buckets B) for a table of `rows` ids given `physical` = H + B rows: H =
    floor(hot_share * physical), at most rows and physical - 1 (B >= 1 keeps a row for any id).

    >>> hybrid_sizes(1_000_000, 62500, 0.5), hybrid_sizes(10, 100, 0.5), hybrid_sizes(10, 1, 0.5)
    ((31250, 31250), (10, 90), (0, 1))
    """
    hot = min(int(hot_share * physical), rows, physical - 1)
    return hot, physical - hot


class HybridEmbeddings(RemappedTables):
    """Hot ids in exact rows, the rest hashed into shared buckets (see the module doc)."""

    name = "hybrid"
    options = {
        **REMAP_OPTIONS,
        "hot_share": Opt(float, min=0),
        "hot_rows": Opt(dict, nullable=True),
        "buckets": Opt(dict, nullable=True),
        "counts": Opt(str, nullable=True),
        "hash_seed": Opt(int, min=0),
        "allocation": Opt(str, choices=("table", "global")),
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
        compression, share = cfg.compression, cfg.hot_share  # types and minimums: `options`
        if share > 1:
            raise ValueError(f"emb.hot_share={share!r}: must be a number in [0, 1]")
        if cfg.allocation == "global" and not cfg.hot_rows:
            raise ValueError("emb.allocation=global needs emb.budget (it sets one count threshold for every table's hot rows)")
        big = [t.name for t in self.tables if t.rows >= 1 << KEY_BITS]
        if big:
            raise ValueError(f"emb=hybrid: tables {big} have 2^{KEY_BITS} rows or more")
        hot_over = table_overrides(cfg.hot_rows, "hot_rows", self.tables, minimum=0)
        bucket_over = table_overrides(cfg.buckets, "buckets", self.tables)
        self.hot, self.buckets = [], []
        for t in self.tables:
            h, b = hybrid_sizes(t.rows, math.ceil(t.rows / compression), share)
            h, b = min(hot_over.get(t.name, h), t.rows), bucket_over.get(t.name, b)
            self.hot.append(h)
            self.buckets.append(b)
        self.physical_tables = [
            TableSpec(t.name, rows=h + b, dim=t.dim, features=t.features)
            for t, h, b in zip(self.tables, self.hot, self.buckets)
        ]
        self.build_tables(optim, cfg.pooling, device, cfg.weights_precision)

        source = counts_source(cfg.counts, runtime, self.name)
        keys = []
        for i, (t, h) in enumerate(zip(self.tables, self.hot)):
            order, _ = frequency_order(t, source)
            keys.append(np.sort(order[:h]) + (i << KEY_BITS))
        # Sorted keys of every table's hot ids, and where each table's start (for hot ranks).
        self.register_buffer("hot_keys", torch.from_numpy(np.concatenate(keys)).to(device))
        starts = np.cumsum([0] + self.hot[:-1])
        table_of_feature = [i for i, t in enumerate(self.tables) for _ in t.features]
        seed = cfg.hash_seed
        params = torch.tensor(
            [hash_coefficients(seed, t.name) + [b, h, i << KEY_BITS, s]
             for i, (t, h, b, s) in enumerate(zip(self.tables, self.hot, self.buckets, starts))],
            dtype=torch.int64,
        )
        # Per feature: (a0, a1, a2, b, buckets, hot rows, key offset, first hot key index).
        self.register_buffer("feature_params", params[table_of_feature].to(device))
        self.check_ids = cfg.check_ids
        self._last: tuple[KeyedJaggedTensor, torch.Tensor] | None = None

    def _per_id(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, per-id feature params): `[F, B]` and `[F, 1, 8]` for equal lengths (single-hot),
        else `[n]` and `[n, 8]`."""
        lengths = features.length_per_key()
        values = features.values()
        if len(set(lengths)) == 1:
            return values.view(len(lengths), -1), self.feature_params.unsqueeze(1)
        per_id = self.feature_params.repeat_interleave(
            torch.tensor(lengths, device=values.device), dim=0, output_size=values.numel()
        )
        return values, per_id

    def remap(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        ids, p = self._per_id(features)
        keys = ids + p[..., 6]
        pos = torch.searchsorted(self.hot_keys, keys.reshape(-1)).view_as(keys)
        found = self.hot_keys[pos.clamp(max=max(len(self.hot_keys) - 1, 0))] if len(self.hot_keys) else keys + 1
        hot = found == keys
        cold = p[..., 5] + universal_hash(ids, p[..., :4], p[..., 4])
        rows = torch.where(hot, pos - p[..., 7], cold).reshape(-1)
        if self.training:
            self._last = (features, rows)
        return rows, features.offsets()

    def embedding_bytes(self) -> int:
        """The TBE's rows and optimizer state plus the hot-id index (8 bytes per hot id)."""
        return super().embedding_bytes() + self.hot_keys.numel() * self.hot_keys.element_size()

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Of the last training batch: hot_hit_rate (share of lookups that hit an exact row),
        collision_rate (share of distinct ids sharing their row with another) and rows_touched."""
        if self._last is None:
            return {}
        features, rows = self._last
        hit = KeyedJaggedTensor(
            keys=features.keys(), values=rows, offsets=features.offsets(), stride=features.stride()
        )
        total, hot_hits = [0, 0, 0], 0
        for (_, ids, _), (_, rows_of_t, _), h in zip(
            per_table(self.tables, features), per_table(self.tables, hit), self.hot
        ):
            total = [a + c for a, c in zip(total, collision_stats(ids, rows_of_t))]
            hot_hits += int((rows_of_t < h).sum())
        return {"hot_hit_rate": hot_hits / max(rows.numel(), 1)} | rates(*total)

    def describe(self) -> str:
        return "\n".join(
            f"{t.name}: hybrid {t.rows} -> {h} hot + {b} hashed rows x {t.dim} ({t.rows / (h + b):.1f}x)"
            for t, h, b in zip(self.tables, self.hot, self.buckets)
        )

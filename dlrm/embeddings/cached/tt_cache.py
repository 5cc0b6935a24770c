"""`emb=cached emb.store=tt`: TT-Rec's hot-row cache (Yin et al., MLSys 2021) in front of TT cores.

Cold rows are TT cores (the `tt` backend, through its `rows()` method). As in TT-Rec, the cache
is filled ONCE from the cores: at construction from the warm-start ranking (counts file, or ids
if they are frequency-ordered) or, with `warm_start: none`, after `emb.tt_populate_step` batches
of online counting. From then on cached rows train as plain rows (fused optimizer) and the cores
train only from the other ids. Cached rows are never written back into the cores (TT-Rec does
not either), so this cache never evicts.

Per batch and table: cached ids look up their slot in the TBE with per-sample weight 1, the
others pool a zero-weighted slot there and their TT rows are pooled separately; the two sums
add up (and are divided by the bag sizes for mean pooling).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import Runtime, TableSpec, check_ids_in_range, per_table
from dlrm.embeddings.cached.cache import HotRowCache
from dlrm.embeddings.tt import TTEmbeddings
from dlrm.embeddings.tt_kernels import pool


class TTHotRowCache(HotRowCache):
    """Hot rows in a fused TBE, filled once from TT cores that train on the other ids."""

    tbe_pooling_sum = True  # cached and TT rows are pooled apart, then divided for mean
    _COUNTERS = (*HotRowCache._COUNTERS, "_tt_filled")

    def init_cold(self, cfg: DictConfig, optim: DictConfig, device: torch.device, runtime: Runtime) -> None:
        tt_cfg = OmegaConf.merge(cfg.tt, {"dim": cfg.dim, "pooling": cfg.pooling})
        self.tt = TTEmbeddings(self.tables, tt_cfg, optim, device, runtime)
        self.tt_populate_step = int(cfg.tt_populate_step)
        self._tt_filled = False
        self._tt_counts: dict[str, torch.Tensor] = {}

    def start(self, ranking: dict[str, torch.Tensor]) -> None:
        super().start(ranking)
        if ranking:
            self._tt_filled = True
        else:  # warm_start none: count ids online, fill after tt_populate_step batches
            self._tt_counts = {t.name: torch.zeros(t.rows, dtype=torch.int64) for t in self.tables}

    def cold_read(self, t: TableSpec, ids: torch.Tensor):
        with torch.no_grad():
            return self.tt.rows(t.name, ids.to(self.device)), None

    def cold_bytes(self) -> int:
        return self.tt.embedding_bytes()

    def cold_description(self) -> str:
        return "tt cores"

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.tt.optimizers()

    def flush(self, step: int | None = None) -> None:
        """Nothing to write back: cached rows never go back into the cores (TT-Rec)."""

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "tt_counts": self._tt_counts}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self._tt_counts = state["tt_counts"]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        self.step += 1
        self._batches += 1
        distinct = self.distinct_ids(features)
        if not self._tt_filled:
            for t, (uid, _, uses) in zip(self.tables, distinct):
                self._tt_counts[t.name].index_add_(0, uid, uses)
            if self.step >= self.tt_populate_step:
                self._prefill(
                    {n: torch.topk(c, self.base_caps[n]).indices.sort().values for n, c in self._tt_counts.items()}
                )
                self._tt_filled, self._tt_counts = True, {}
        batch = features.stride()
        slot_values, hit_weights, tt_blocks = [], [], []
        for (t, _, bag_offsets), (uid, inverse, uses) in zip(per_table(self.tables, features), distinct):
            n = len(t.features)
            c = self.caches[t.name]
            slots = c.slot_of[uid].to(torch.int64)
            hit = slots >= 0
            self._lookups += int(uses.sum())
            self._hits += int(uses[hit].sum())
            if self.policy == "lfu":
                c.score[slots[hit]] += uses[hit].to(torch.float64)
            # Cached ids look up their slot; the others pool a zero-weighted slot 0 there.
            occ_slot = slots[inverse]
            occ_hit = occ_slot >= 0
            slot_values.append(torch.where(occ_hit, occ_slot, 0))
            hit_weights.append(occ_hit)
            cold = (~hit).nonzero().flatten()
            rows = torch.zeros(len(uid), t.dim, device=self.device)
            if len(cold):
                cold_rows = self.tt.rows(t.name, uid[cold].to(self.device))
                rows = rows.index_put((cold.to(self.device),), cold_rows)
            pooled = pool(rows, inverse.to(self.device), bag_offsets, "sum")
            tt_blocks.extend(pooled.view(n, batch, t.dim).unbind(0) if n > 1 else [pooled])
        offsets = features.offsets()
        idx = torch.cat(slot_values).to(self.device)
        weights = torch.cat(hit_weights).to(self.device, torch.float32)
        out = self.tbe(idx, offsets, per_sample_weights=weights) + torch.cat(tt_blocks, 1)
        if self.pooling == "mean":
            lengths = (offsets[1:] - offsets[:-1]).to(torch.float32)
            per_feature = lengths.view(len(self.features), batch).clamp(min=1).t()
            out = out / torch.repeat_interleave(per_feature, torch.tensor(self.dims, device=out.device), dim=1)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=out)

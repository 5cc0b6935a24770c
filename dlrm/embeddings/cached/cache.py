"""What every hot-row cache shares: an fbgemm TBE of `cache_rows` rows per table (tables.py's
`fused_tables`, trained with the same fused optimizer as `emb=full`), the slot maps (slots.py),
the warm-start prefill, counters and stats, and checkpointing of all that.

Subclasses say where rows come from and how misses are handled: `WriteBackCache` (write_back.py,
a Store behind an evicting cache) and `TTHotRowCache` (tt_cache.py, TT-Rec's fill-once cache in
front of TT cores). `CachedEmbeddings` (cached/__init__.py) picks one by `emb.store`.

`embedding_bytes()` is what stays resident: the cache (weights + optimizer state), its maps
(id->slot int32 per row, slot->id int64 and a float64 score per slot), plus `cold_bytes()`.
"""

from __future__ import annotations

import atexit
import weakref
from abc import abstractmethod

import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings.base import EmbeddingBackend, Runtime, TableSpec, per_table
from dlrm.embeddings.cached.slots import POLICIES, STORE_KINDS, WARM_STARTS, TableSlots, cache_sizes, warm_start
from dlrm.embeddings.policy import POLICY_OPTIONS
from dlrm.embeddings.tables import STATE_WIDTH, check_fused_optimizer, fused_tables, tbe_bytes
from dlrm.embeddings.tt import TT_OPTIONS
from dlrm.options import Opt, check_options


class HotRowCache(EmbeddingBackend):
    """A fused TBE over `cache_rows` rows per table in front of cold rows kept elsewhere.

    `tables`, `cfg` (the emb section), `optim` (optim.sparse), `device`, `runtime` as for every
    backend; the cache's random choices (eviction sampling) are seeded by `runtime.seed`.
    Raises ValueError naming the emb key for a bad policy, warm start or cache size.
    """

    name = "cached"
    options = {
        **POLICY_OPTIONS,
        "store": Opt(str, choices=STORE_KINDS),
        "cache_rows": Opt(int, min=1, nullable=True),
        "cache_fraction": Opt(float, min=0, nullable=True),
        "policy": Opt(str, choices=POLICIES),
        "warm_start": Opt(str, choices=WARM_STARTS),
        "counts": Opt(str, nullable=True),
        "path": Opt(str, nullable=True),
        "random_access": Opt(bool),
        "durable": Opt(bool),
        "tt_populate_step": Opt(int, min=0),
        "shrink_after": Opt(int, min=0),
        "evict_sample": Opt(int, min=0),
        "tt": Opt(dict),
    }
    tbe_pooling_sum = False  # True: the TBE always sums (a subclass pools/divides itself)
    _COUNTERS: tuple[str, ...] = ("step", "_hits", "_lookups", "_evictions", "_bytes_moved", "_grows", "_batches")

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
        runtime = runtime or Runtime()
        self.device, self.optim = device, optim
        self.pooling, self.check_ids = cfg.pooling, cfg.check_ids
        self.policy = cfg.policy
        check_fused_optimizer(optim)
        width = STATE_WIDTH[optim.name]
        if width is None:  # element-wise Adagrad: one state float per column
            dims = {t.dim for t in self.tables}
            if len(dims) > 1:
                raise ValueError("emb=cached with optim.sparse.name=adagrad needs one dim for all tables")
            width = dims.pop()
        self.state_width = width
        self.base_caps = cache_sizes(self.tables, cfg.cache_rows, cfg.cache_fraction)
        priors, ranking = warm_start(self.tables, self.base_caps, cfg.warm_start, cfg.counts)
        self.caches = {t.name: TableSlots(t, self.base_caps[t.name], priors.get(t.name)) for t in self.tables}
        self.step = self._hits = self._lookups = self._evictions = self._bytes_moved = self._batches = 0
        self._grows = 0  # times the cache grew for a batch with more distinct ids than it holds
        self._rng = torch.Generator().manual_seed(int(runtime.seed))
        self.init_cold(cfg, optim, device, runtime)
        self._build_tbe(dict(self.base_caps))
        self.start(ranking)
        ref = weakref.ref(self)
        atexit.register(lambda: (m := ref()) is not None and m.flush_at_exit and m.flush())

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        check_options(cfg.tt, TT_OPTIONS, "emb.tt")  # the cold rows' TT settings (store=tt)

    # ------------------------------------------------------------------ what subclasses say

    @abstractmethod
    def init_cold(self, cfg: DictConfig, optim: DictConfig, device: torch.device, runtime: Runtime) -> None:
        """Build where the cold rows live (before the cache's TBE is built)."""

    @abstractmethod
    def cold_read(self, t: TableSpec, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights [n, dim], optimizer state [n, width] or None = zeros) of rows `ids` of `t`."""

    @abstractmethod
    def cold_bytes(self) -> int:
        """Resident bytes of the cold rows (0 for files)."""

    @abstractmethod
    def cold_description(self) -> str:
        """Where the cold rows live, for `describe()`."""

    def start(self, ranking: dict[str, torch.Tensor]) -> None:
        """After construction: prefill the cache with the warm start's ids (if any)."""
        if ranking:
            self._prefill(ranking)

    # ------------------------------------------------------------------ the cache's table

    def _build_tbe(self, caps: dict[str, int]) -> None:
        specs = [TableSpec(t.name, caps[t.name], t.dim, t.features) for t in self.tables]
        self.tbe = fused_tables(specs, self.optim, "sum" if self.tbe_pooling_sum else self.pooling, self.device)
        for t in self.tables:
            self.caches[t.name].reset(caps[t.name])
        # Views into the TBE's storage (writes land in the table), made once: fbgemm builds
        # them in Python on every call (~0.1 ms each, several per table per step).
        with torch.no_grad():
            self._w_views = [w.detach() for w in self.tbe.split_embedding_weights()]
            states = self.tbe.split_optimizer_states()
            self._s_views = [
                states[i][0].detach().view(caps[t.name], -1) if states else None
                for i, t in enumerate(self.tables)
            ]

    def _load(self, i: int, t: TableSpec, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Read rows `ids` of table `i` from the cold rows into cache `slots`."""
        w, s = self.cold_read(t, ids)
        dev_slots = slots.to(self.device)
        with torch.no_grad():
            self._w_views[i].index_copy_(0, dev_slots, w.to(self.device))
            state = self._s_views[i]
            if state is not None:
                if s is None:
                    state.index_fill_(0, dev_slots, 0.0)
                else:
                    state.index_copy_(0, dev_slots, s.to(self.device))
        c = self.caches[t.name]
        c.slot_of[ids] = slots.to(torch.int32)
        c.id_of[slots] = ids

    def _prefill(self, ranking: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.tables):
            ids = ranking[t.name][: self.caches[t.name].capacity]
            c = self.caches[t.name]
            slots = torch.arange(len(ids))
            self._load(i, t, ids, slots)
            if c.prior is not None:
                c.score[slots] = c.prior_of(ids)
            else:  # ids mode: as if each was seen once, ranked; a one-off newcomer scores lower
                c.score[slots] = 1.0 + (len(ids) - slots.to(torch.float64)) / max(len(ids), 1)
        self._bytes_moved = 0  # prefill is a one-off, not per-step traffic

    def distinct_ids(self, features: KeyedJaggedTensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per table: (distinct ids, inverse, uses) of the batch's ids, on the CPU (the maps' side)."""
        return [
            torch.unique(ids.cpu(), return_inverse=True, return_counts=True)
            for _, ids, _ in per_table(self.tables, features)
        ]

    # ------------------------------------------------------------------ state

    def checkpoint_state(self) -> dict:
        """The cache's rows and optimizer state (state_dict: the TBE, and the TT cores for
        store=tt), which id each slot holds, policy scores, counters and the eviction RNG."""
        return {
            "module": self.state_dict(),
            "caches": {n: (c.capacity, c.id_of.clone(), c.score.clone()) for n, c in self.caches.items()},
            "counters": {k: getattr(self, k) for k in self._COUNTERS},
            "rng": self._rng.get_state(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        caps = {n: cap for n, (cap, _, _) in state["caches"].items()}
        if caps != {n: c.capacity for n, c in self.caches.items()}:
            self._build_tbe(caps)  # the cache had grown for a large batch when it was saved
        self.load_state_dict(state["module"])  # copies into the TBE's tensors: views stay valid
        for name, (_, id_of, score) in state["caches"].items():
            c = self.caches[name]
            c.id_of.copy_(id_of)
            c.score.copy_(score)
            c.slot_of.fill_(-1)
            slots = (id_of >= 0).nonzero().flatten()
            c.slot_of[id_of[slots]] = slots.to(torch.int32)
        for k, v in state["counters"].items():
            if k in self._COUNTERS:  # checkpoints before the split held every kind's counters
                setattr(self, k, v)
        self._rng.set_state(state["rng"])

    # ------------------------------------------------------------------ accounting

    def embedding_bytes(self) -> int:
        return tbe_bytes(self.tbe) + sum(c.map_bytes() for c in self.caches.values()) + self.cold_bytes()

    def stats(self) -> dict[str, float]:
        steps = max(self._batches, 1)
        return {
            "cache_hit_rate": self._hits / max(self._lookups, 1),
            "cache_evictions_per_step": self._evictions / steps,
            "cache_bytes_moved_per_step": self._bytes_moved / steps,
            "cache_grows": float(self._grows),
        }

    def describe(self) -> str:
        return "\n".join(
            f"{t.name}: cached {t.rows} x {t.dim}, {self.base_caps[t.name]} rows cached "
            f"({self.policy}), cold store {self.cold_description()}"
            for t in self.tables
        )

"""`emb=cached` with `emb.store=host|disk`: an evicting write-back cache in front of a Store.

Criteo ids are heavily skewed, so a cache of ~1% of a table's rows serves most lookups. Each batch:

1. `torch.unique` the ids of each table; look their slots up in a dense int32 id->slot map;
2. for the misses, pick victims by policy among slots this batch does not use (LFU: fewest
   counted uses, seeded from the warm-start counts; LRU: least recently used step), write the
   victims' weights AND optimizer state back to the store, and load the missing rows and
   their state into the freed slots;
3. remap the batch's ids to slots and run the TBE; its fused backward updates the cached rows.

Row-wise Adagrad (and SGD, and element-wise Adagrad) update a row from that row's gradient and
state only, so training equals `emb=full` exactly (tests prove it at a 1% cache): no update is
lost. `flush()` writes every cached row back; it runs at exit (atexit) and whenever the store
must be read (`cold_rows`).

A batch whose distinct ids of a table exceed its cache is never an error: the cache grows to
that batch's size (everything is written back, the TBE rebuilt and the cached rows reloaded)
and shrinks back to `cache_rows` after `emb.shrink_after` batches in a row that fit (growing
and shrinking every other batch would cost a full flush each time). `stats()["cache_grows"]`
counts the grows; the first one logs a warning.

Stores (store.py's protocol): `host` (host.py: full table + state in host memory; on CPU the
cache still bounds the working set) and `disk` (disk.py: numpy memmaps under `emb.path`, else
`<store dir>/emb_store` from the Runtime; only the cache, the maps and touched pages stay
resident).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import FP32_BYTES, Runtime, TableSpec, check_ids_in_range
from dlrm.embeddings.cached.cache import HotRowCache
from dlrm.embeddings.cached.disk import DiskStore
from dlrm.embeddings.cached.host import HostStore
from dlrm.embeddings.cached.slots import TableSlots
from dlrm.embeddings.cached.store import Store

log = logging.getLogger(__name__)


def disk_path(path: str | None, runtime: Runtime) -> Path:
    """Where a disk store lives: `emb.path`, else `<runtime.store_dir>/emb_store`, else (built
    outside a run: tests, scripts) a fresh temp dir, logged."""
    if path:
        return Path(path)
    if runtime.store_dir is not None:
        return Path(runtime.store_dir) / "emb_store"
    where = Path(tempfile.mkdtemp(prefix="dlrm-emb-store-"))
    log.info("emb.path is null and no run dir was given: the disk store goes to %s", where)
    return where


class WriteBackCache(HotRowCache):
    """A fused TBE over `cache_rows` rows per table, written back into a host or disk Store."""

    _COUNTERS = (*HotRowCache._COUNTERS, "_fit_streak")

    def init_cold(self, cfg: DictConfig, optim: DictConfig, device: torch.device, runtime: Runtime) -> None:
        self.store_kind = cfg.store
        if cfg.store == "host":
            self.store: Store = HostStore(self.tables, self.state_width)
        else:
            self.store = DiskStore(
                self.tables, self.state_width, disk_path(cfg.path, runtime), bool(cfg.random_access),
                resume=runtime.resuming, durable=bool(cfg.durable), seed=runtime.seed,
            )
        self.shrink_after = int(cfg.shrink_after)
        self.evict_sample = int(cfg.evict_sample)
        self._fit_streak = 0

    def start(self, ranking: dict[str, torch.Tensor]) -> None:
        super().start(ranking)
        self._flushed_clean = True

    def cold_read(self, t: TableSpec, ids: torch.Tensor):
        self._bytes_moved += len(ids) * (t.dim + self.state_width) * FP32_BYTES
        return self.store.read(t.name, ids)

    def cold_bytes(self) -> int:
        return self.store.resident_bytes()

    def cold_description(self) -> str:
        return self.store.describe()

    # ------------------------------------------------------------------ writing back

    def _write_back(self, i: int, t: TableSpec, slots: torch.Tensor) -> None:
        c = self.caches[t.name]
        ids = c.id_of[slots]
        self._store_rows(i, t, ids, slots)
        self._bytes_moved += len(ids) * (t.dim + self.state_width) * FP32_BYTES
        c.slot_of[ids] = -1
        c.id_of[slots] = -1

    def _store_rows(self, i: int, t: TableSpec, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Write the cached rows in `slots` (ids `ids`) and their optimizer state to the store."""
        dev_slots = slots.to(self.device)
        with torch.no_grad():
            w = self._w_views[i].index_select(0, dev_slots).cpu()
            state = self._s_views[i]
            s = state.index_select(0, dev_slots).cpu() if state is not None else None
        self.store.write(t.name, ids, w, s)

    def flush(self, step: int | None = None) -> None:
        """Write every cached row and its optimizer state back to the store and sync it.

        The cache stays valid (rows remain cached), so training can continue after a flush. A disk
        store records `step` as its `committed_step`: a crash later rolls it back to this flush.
        """
        # With no forward since the last flush the cached rows are as written back then; writing
        # them again would make the store commit anew and forget the step of that flush.
        if not self._flushed_clean:
            self._write_back_all()
        self.store.flush(step)
        self._flushed_clean = True  # the next forward marks a disk store dirty again

    def _write_back_all(self) -> None:
        """Every cached row and its optimizer state into the store, without committing it: only
        `flush` (the end of a run, a checkpoint) moves a disk store's last committed state."""
        for i, t in enumerate(self.tables):
            c = self.caches[t.name]
            slots = (c.id_of >= 0).nonzero().flatten()
            if len(slots):
                self._store_rows(i, t, c.id_of[slots], slots)

    def checkpoint_state(self) -> dict:
        """The cache's state (HotRowCache) and, for store=host, the store's tables. A disk store's
        tables stay in their files, which the trainer commits at the checkpoint's step right
        after saving this."""
        state = super().checkpoint_state()
        saved = self.store.checkpoint_state()
        if saved is not None:
            state["host"] = saved
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        if "host" in state:
            self.store.load_checkpoint_state(state["host"])

    def committed_step(self) -> int | None:
        return self.store.committed_step

    def load_weights(self, name: str, weights: torch.Tensor) -> None:
        """Replace table `name`'s weights (all rows) in the store and in the cache.

        Used to start from the same init as another run (the exactness tests); optimizer state
        is left as it is.
        """
        i = [t.name for t in self.tables].index(name)
        with torch.no_grad():
            self.store.write(name, torch.arange(weights.shape[0]), weights.detach().cpu(), None)
            c = self.caches[name]
            slots = (c.id_of >= 0).nonzero().flatten()
            self._w_views[i][slots.to(self.device)] = self.store.read(name, c.id_of[slots])[0].to(self.device)

    def cold_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, state) of all rows of table `name` as the store holds them, after a flush."""
        self.flush()
        rows = next(t.rows for t in self.tables if t.name == name)
        return self.store.read(name, torch.arange(rows))

    # ------------------------------------------------------------------ forward

    def _resize(self, need: dict[str, int]) -> None:
        """Rebuild the TBE with `need` rows per table, writing everything back first."""
        self._write_back_all()
        saved = {n: (c.id_of.clone(), c.score.clone()) for n, c in self.caches.items()}
        for c in self.caches.values():
            c.slot_of.fill_(-1)
        self._build_tbe(need)
        for i, t in enumerate(self.tables):  # reload what fits, so a resize costs no misses
            ids, score = saved[t.name]
            keep = (ids >= 0).nonzero().flatten()
            if len(keep) > need[t.name]:
                keep = keep[torch.topk(score[keep], need[t.name]).indices]
            slots = torch.arange(len(keep))
            self._load(i, t, ids[keep], slots)
            self.caches[t.name].score[slots] = score[keep]

    def _victims(self, c: TableSlots, k: int, in_use: torch.Tensor) -> torch.Tensor:
        """`k` occupied slots not in `in_use` with the lowest policy score.

        Exact scan when the cache is small; else (emb.evict_sample = m > 0) the k lowest of
        ~m*k random slots, as Redis approximates LFU/LRU: a topk over a 2M-slot cache took
        ~14 ms per step at 200k slots, the sample costs O(m*k). The choice of victims never
        affects exactness, only the hit rate.
        """
        m = self.evict_sample
        if m > 0 and m * k < c.capacity:
            cand = torch.unique(torch.randint(c.capacity, (m * k,), generator=self._rng))
            score = c.score[cand]
            score[c.id_of[cand] < 0] = math.inf
            used = torch.zeros(c.capacity, dtype=torch.bool)
            used[in_use] = True
            score[used[cand]] = math.inf  # never evict a row this batch uses
            if int(torch.isfinite(score).sum()) >= k:
                return cand[torch.topk(score, k, largest=False).indices]
        score = c.score.clone()
        score[in_use] = math.inf  # never evict a row this batch uses
        score[c.id_of < 0] = math.inf
        return torch.topk(score, k, largest=False).indices

    def _admit(self, i: int, t: TableSpec, uid: torch.Tensor, uses: torch.Tensor) -> torch.Tensor:
        """Slots of the distinct ids `uid` (used `uses` times each), loading misses."""
        c = self.caches[t.name]
        slots = c.slot_of[uid].to(torch.int64)
        miss = slots < 0
        n_miss = int(miss.sum())
        self._lookups += int(uses.sum())
        self._hits += int(uses[~miss].sum())
        if n_miss:
            free = (c.id_of < 0).nonzero().flatten()
            if len(free) < n_miss:
                k = n_miss - len(free)
                victims = self._victims(c, k, slots[~miss])
                self._write_back(i, t, victims)
                self._evictions += k
                free = torch.cat([free, victims])
            new = free[:n_miss]
            self._load(i, t, uid[miss], new)
            slots[miss] = new
            if self.policy == "lfu":
                c.score[new] = c.prior_of(uid[miss])
        if self.policy == "lfu":
            c.score[slots] += uses.to(torch.float64)
        else:
            c.score[slots] = float(self.step)
        return slots

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        self.step += 1
        self._batches += 1
        per_table = self.distinct_ids(features)
        if self._flushed_clean:  # before the first write after a flush (a resize writes back)
            self.store.mark_dirty()
            self._flushed_clean = False
        current = {t.name: self.caches[t.name].capacity for t in self.tables}
        distinct = {t.name: len(u) for t, (u, _, _) in zip(self.tables, per_table)}
        fits = all(distinct[n] <= self.base_caps[n] for n in distinct)
        self._fit_streak = self._fit_streak + 1 if fits else 0
        if any(distinct[n] > current[n] for n in distinct):
            self._grows += 1
            if self._grows == 1:
                log.warning(
                    "emb=cached: a batch has %s distinct ids per table, more than the cache %s: "
                    "growing the cache (set emb.cache_rows above the distinct ids per batch to "
                    "avoid this)", distinct, current,
                )
            self._resize({n: max(current[n], distinct[n]) for n in current})
        elif current != self.base_caps and self._fit_streak >= self.shrink_after:
            self._resize(dict(self.base_caps))
        remapped = [
            self._admit(i, t, uid, uses)[inverse]
            for i, (t, (uid, inverse, uses)) in enumerate(zip(self.tables, per_table))
        ]
        slot_values = torch.cat(remapped).to(self.device) if remapped else features.values()
        pooled = self.tbe(slot_values, features.offsets())
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=pooled)

"""`emb=cached`: hot rows in a fast cache in front of a cold store (issue 6).

Criteo ids are heavily skewed, so a cache of ~1% of a table's rows serves most lookups. The
cache IS an fbgemm TBE (full.py's `fused_tables`) with `cache_rows` rows per table, trained with
the same fused optimizer as `emb=full`. Each batch:

1. `torch.unique` the ids of each table; look their slots up in a dense int32 id->slot map;
2. for the misses, pick victims by policy among slots this batch does not use (LFU: fewest
   counted uses, seeded from the warm-start counts; LRU: least recently used step), write the
   victims' weights AND optimizer state back to the cold store, and load the missing rows and
   their state into the freed slots;
3. remap the batch's ids to slots and run the TBE; its fused backward updates the cached rows.

Row-wise Adagrad (and SGD, and element-wise Adagrad) update a row from that row's gradient and
state only, so with store=host or store=disk training equals `emb=full` exactly (tests prove
it at a 1% cache): no update is lost. `flush()` writes every cached row back; it runs at exit
(atexit) and whenever the cold store must be read (`cold_rows`).

A batch whose distinct ids of a table exceed its cache is never an error: the cache grows to
that batch's size (everything is written back, the TBE rebuilt and the cached rows reloaded)
and shrinks back to `cache_rows` after `emb.shrink_after` batches in a row that fit (growing
and shrinking every other batch would cost a full flush each time). `stats()["cache_grows"]`
counts the grows; the first one logs a warning.

Stores (`emb.store`), see cache_store.py:
- `host`: full table + state in host memory; hot rows in the device's memory (on CPU the cache
  still bounds the working set: the TBE only ever sees cache_rows rows).
- `disk`: full table + state in numpy memmaps under `emb.path`: only the cache, the id->slot map
  and the pages being read stay resident.
- `tt`: cold rows are TT cores (the `tt` backend's code). As in TT-Rec, the cache is filled ONCE
  from the cores, at construction from the warm-start ranking (counts file, or ids if they are
  frequency-ordered) or, with `warm_start: none`, after `emb.tt_populate_step` batches of
  online counting; from then on cached rows train as plain rows (fused optimizer) and the cores
  train only from the other ids. Cached rows are never written back into the cores (TT-Rec
  does not either), so the cache never evicts in this mode.

`embedding_bytes()` is what stays resident: the cache (weights + optimizer state), its maps
(id->slot int32 per row, slot->id int64 and a float64 score per slot), plus the host table for
store=host, plus the cores and their state for store=tt; for store=disk NOT the files (their
pages are reclaimable page cache).

Example::

    cfg = OmegaConf.create({"name": "cached", "dim": 16, "pooling": "sum", "store": "host",
                            "cache_fraction": 0.01, "policy": "lfu", "warm_start": "ids"})
    emb = build_embeddings(tables, cfg, optim, cpu)
    pooled = emb(kjt); ...; emb.flush()
"""

from __future__ import annotations

import atexit
import logging
import math
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import FP32_BYTES, EmbeddingBackend, TableSpec, check_ids_in_range
from dlrm.embeddings.cache_store import DiskStore, HostStore
from dlrm.embeddings.tables import fused_tables, tbe_bytes

log = logging.getLogger(__name__)

STORES = ("host", "disk", "tt")
POLICIES = ("lfu", "lru")
WARM_STARTS = ("auto", "counts", "ids", "none")
STATE_WIDTH = {"sgd": 0, "rowwise_adagrad": 1, "adagrad": None}  # None: = dim


def cache_sizes(tables: list[TableSpec], cfg: DictConfig) -> dict[str, int]:
    """Cache rows per table from emb.cache_rows (wins) or emb.cache_fraction."""
    rows_cfg, frac = cfg.get("cache_rows"), cfg.get("cache_fraction")
    sizes = {}
    for t in tables:
        if t.rows <= 0:
            raise ValueError(f"emb=cached: table {t.name} has {t.rows} rows; it needs at least 1")
        if rows_cfg is not None:
            n = int(rows_cfg)
            if n <= 0:
                raise ValueError(f"emb.cache_rows={rows_cfg}: must be >= 1 (or null to use cache_fraction)")
        elif frac is not None:
            if not 0 < float(frac) <= 1:
                raise ValueError(f"emb.cache_fraction={frac}: must be in (0, 1]")
            n = max(1, math.ceil(float(frac) * t.rows))
        else:
            raise ValueError("emb=cached: set emb.cache_rows or emb.cache_fraction")
        if n > t.rows:
            warnings.warn(
                f"emb.cache_rows={n} exceeds table {t.name}'s {t.rows} rows; using {t.rows}",
                stacklevel=2,
            )
            n = t.rows
        sizes[t.name] = n
    return sizes


class _TableCache:
    """Bookkeeping of one table's cache: id->slot, slot->id, per-slot policy score."""

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


class CachedEmbeddings(EmbeddingBackend):
    """A fused TBE over `cache_rows` rows per table, backed by a host, disk or TT cold store."""

    name = "cached"

    def __init__(
        self, tables: list[TableSpec], cfg: DictConfig, optim: DictConfig, device: torch.device, runtime=None
    ) -> None:
        super().__init__(tables)
        self.device = device
        self.optim = optim
        self.pooling = cfg.get("pooling", "sum")
        self.check_ids = cfg.get("check_ids", True)
        self.store_kind = cfg.get("store", "host")
        if self.store_kind not in STORES:
            raise ValueError(f"emb.store={self.store_kind!r}: choose one of {list(STORES)}")
        self.policy = cfg.get("policy", "lfu")
        if self.policy not in POLICIES:
            raise ValueError(f"emb.policy={self.policy!r}: choose one of {list(POLICIES)}")
        warm = cfg.get("warm_start", "auto")
        if warm not in WARM_STARTS:
            raise ValueError(f"emb.warm_start={warm!r}: choose one of {list(WARM_STARTS)}")
        if optim.name not in STATE_WIDTH:
            raise ValueError(
                f"optim.sparse.name={optim.name!r}: fused table optimizers are {sorted(STATE_WIDTH)}"
            )
        dims = {t.dim for t in self.tables}
        width = STATE_WIDTH[optim.name]
        if width is None:
            if len(dims) > 1:
                raise ValueError("emb=cached with optim.sparse.name=adagrad needs one dim for all tables")
            width = dims.pop()
        self.state_width = width

        self.base_caps = cache_sizes(self.tables, cfg)
        priors, ranking = self._warm_start(cfg, warm)
        self.caches = {
            t.name: _TableCache(t, self.base_caps[t.name], priors.get(t.name)) for t in self.tables
        }
        self.step = 0
        self._hits = self._lookups = self._evictions = self._bytes_moved = self._grows = 0
        self._batches = 0

        if self.store_kind == "host":
            self.store = HostStore(self.tables, width)
        elif self.store_kind == "disk":
            self.store = DiskStore(
                self.tables, width, self._disk_path(cfg), bool(cfg.get("random_access", True)),
                resume=bool(cfg.get("resume", False)), durable=bool(cfg.get("durable", False)),
            )
        else:
            self.store = None
            self._init_tt(cfg, optim, device)
        self.tt_populate_step = int(cfg.get("tt_populate_step", 100))
        self.shrink_after = int(cfg.get("shrink_after", 100))
        self.evict_sample = int(cfg.get("evict_sample", 16))
        if self.evict_sample < 0:
            raise ValueError(f"emb.evict_sample={self.evict_sample}: must be >= 0 (0 = exact scan)")
        self._rng = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        self._fit_streak = 0
        self._tt_counts: dict[str, torch.Tensor] = {}
        self._tt_filled = False
        self._build_tbe({t.name: self.base_caps[t.name] for t in self.tables})
        if ranking:
            self._prefill(ranking)
        elif self.store_kind == "tt":
            self._tt_counts = {t.name: torch.zeros(t.rows, dtype=torch.int64) for t in self.tables}
        self._flushed_clean = True
        ref = weakref.ref(self)
        atexit.register(lambda: (m := ref()) is not None and m.flush_at_exit and m.flush())

    # ------------------------------------------------------------------ construction helpers

    def _disk_path(self, cfg: DictConfig) -> Path:
        path = cfg.get("path")
        if path:
            return Path(path)
        try:
            from hydra.core.hydra_config import HydraConfig

            return Path(HydraConfig.get().runtime.output_dir) / "emb_store"
        except Exception:  # not under a Hydra run (tests, scripts)
            return Path(tempfile.mkdtemp(prefix="dlrm-emb-store-"))

    def _warm_start(self, cfg: DictConfig, warm: str) -> tuple[dict, dict]:
        """(prior counts per table, ids to prefill per table) for the warm start."""
        counts_dir = cfg.get("counts")
        if warm == "auto":
            warm = "counts" if counts_dir else "ids"
        priors, ranking = {}, {}
        if warm == "none":
            return priors, ranking
        for t in self.tables:
            cap = self.base_caps[t.name]
            if warm == "ids":  # ids numbered by descending frequency (synthetic, preprocessed)
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
                raise ValueError(
                    f"emb.counts: {files[0]} has shape {counts.shape}, table {t.name} has {t.rows} rows"
                )
            priors[t.name] = counts
            top = np.argpartition(-np.asarray(counts), cap - 1)[:cap] if cap < t.rows else np.arange(t.rows)
            ranking[t.name] = torch.from_numpy(np.sort(top).astype(np.int64))
        return priors, ranking

    def _init_tt(self, cfg: DictConfig, optim: DictConfig, device: torch.device) -> None:
        from dlrm.embeddings.tt import TTEmbeddings

        tt_cfg = OmegaConf.merge(
            OmegaConf.create({"dim": 16, "pooling": "sum"}),
            {k: cfg[k] for k in ("dim", "pooling") if k in cfg},
            # resolved first: merged into a new root, `rank: ${rank}` would point at itself
            OmegaConf.to_container(cfg.tt, resolve=True) if cfg.get("tt") else {},
        )
        self.tt = TTEmbeddings(self.tables, tt_cfg, optim, device)

    def _build_tbe(self, caps: dict[str, int]) -> None:
        specs = [TableSpec(t.name, caps[t.name], t.dim, t.features) for t in self.tables]
        # The TT store pools cached and TT rows separately, then divides for mean: TBE sums.
        pooling = "sum" if self.store_kind == "tt" else self.pooling
        self.tbe = fused_tables(specs, self.optim, pooling, self.device)
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

    def _weights(self, i: int) -> torch.Tensor:
        return self._w_views[i]

    def _state(self, i: int) -> torch.Tensor | None:
        return self._s_views[i]

    # ------------------------------------------------------------------ moving rows

    def _cold_read(self, i: int, t: TableSpec, ids: torch.Tensor):
        if self.store_kind == "tt":
            from dlrm.embeddings.tt_kernels import tt_rows

            with torch.no_grad():
                w = tt_rows(list(self.tt.cores[t.name]), self.tt.shapes[t.name], ids.to(self.device))
            return w, None
        self._bytes_moved += len(ids) * (t.dim + self.state_width) * FP32_BYTES
        return self.store.read(t.name, ids)

    def _load(self, i: int, t: TableSpec, ids: torch.Tensor, slots: torch.Tensor) -> None:
        w, s = self._cold_read(i, t, ids)
        dev_slots = slots.to(self.device)
        with torch.no_grad():
            self._weights(i).index_copy_(0, dev_slots, w.to(self.device))
            state = self._state(i)
            if state is not None:
                if s is None:
                    state.index_fill_(0, dev_slots, 0.0)
                else:
                    state.index_copy_(0, dev_slots, s.to(self.device))
        c = self.caches[t.name]
        c.slot_of[ids] = slots.to(torch.int32)
        c.id_of[slots] = ids

    def _write_back(self, i: int, t: TableSpec, slots: torch.Tensor) -> None:
        c = self.caches[t.name]
        ids = c.id_of[slots]
        if self.store_kind != "tt":  # TT-Rec semantics: cached rows never go back to the cores
            self._store_rows(i, t, ids, slots)
            self._bytes_moved += len(ids) * (t.dim + self.state_width) * FP32_BYTES
        c.slot_of[ids] = -1
        c.id_of[slots] = -1

    def _store_rows(self, i: int, t: TableSpec, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Write the cached rows in `slots` (ids `ids`) and their optimizer state to the store."""
        dev_slots = slots.to(self.device)
        with torch.no_grad():
            w = self._weights(i).index_select(0, dev_slots).cpu()
            state = self._state(i)
            s = state.index_select(0, dev_slots).cpu() if state is not None else None
        self.store.write(t.name, ids, w, s)

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
        self._tt_filled = self.store_kind == "tt"

    def flush(self, step: int | None = None) -> None:
        """Write every cached row and its optimizer state back to the cold store and sync it.

        The cache stays valid (rows remain cached), so training can continue after a flush. A disk
        store records `step` as its `committed_step`: a crash later rolls it back to this flush.
        """
        if self.store_kind == "tt":
            return
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

    _COUNTERS = ("step", "_hits", "_lookups", "_evictions", "_bytes_moved", "_grows", "_batches",
                 "_fit_streak", "_tt_filled")

    def checkpoint_state(self) -> dict:
        """The cache's rows and optimizer state (state_dict: the TBE, and the TT cores for
        store=tt), which id each slot holds, policy scores, counters and the eviction RNG; for
        store=host the store's tables too. A disk store's tables stay in their files, which the
        trainer commits at the checkpoint's step right after saving this."""
        state = {
            "module": self.state_dict(),
            "caches": {n: (c.capacity, c.id_of.clone(), c.score.clone()) for n, c in self.caches.items()},
            "counters": {k: getattr(self, k) for k in self._COUNTERS},
            "rng": self._rng.get_state(),
            "tt_counts": self._tt_counts,
        }
        if self.store_kind == "host":
            state["host"] = (self.store.weights, self.store.state)
        return state

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
            setattr(self, k, v)
        self._rng.set_state(state["rng"])
        self._tt_counts = state["tt_counts"]
        if self.store_kind == "host":
            for mine, saved in zip((self.store.weights, self.store.state), state["host"]):
                for name in mine:
                    mine[name].copy_(saved[name])

    def committed_step(self) -> int | None:
        return self.store.committed_step if self.store_kind == "disk" else None

    def load_weights(self, name: str, weights: torch.Tensor) -> None:
        """Replace table `name`'s weights (all rows) in the cold store and in the cache.

        Used to start from the same init as another run (the exactness tests); optimizer state
        is left as it is.
        """
        if self.store_kind == "tt":
            raise ValueError("emb.store=tt has no row store to load weights into")
        i = [t.name for t in self.tables].index(name)
        with torch.no_grad():
            self.store.write(name, torch.arange(weights.shape[0]), weights.detach().cpu(), None)
            c = self.caches[name]
            slots = (c.id_of >= 0).nonzero().flatten()
            self._weights(i)[slots.to(self.device)] = self.store.weights[name][c.id_of[slots]].to(self.device)

    def cold_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, state) of all rows of table `name` as the cold store holds them, after a flush."""
        self.flush()
        return self.store.read(name, torch.arange(self.store.weights[name].shape[0]))

    # ------------------------------------------------------------------ forward

    def _resize(self, need: dict[str, int]) -> None:
        """Rebuild the TBE with `need` rows per table, writing everything back first."""
        if self.store_kind == "tt":
            raise AssertionError("the TT store never resizes its cache")
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

    def _victims(self, c: _TableCache, k: int, in_use: torch.Tensor) -> torch.Tensor:
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
        values, offsets = features.values(), features.offsets()
        value_start = features.offset_per_key()
        self.step += 1
        self._batches += 1
        per_table, key = [], 0
        for t in self.tables:
            n = len(t.features)
            ids = values[value_start[key] : value_start[key + n]].cpu()
            uid, inverse, uses = torch.unique(ids, return_inverse=True, return_counts=True)
            per_table.append((uid, inverse, uses))
            key += n
        if self.store_kind == "tt":
            return self._forward_tt(features, per_table)
        if self._flushed_clean:  # before the first write after a flush (a resize writes back)
            if self.store_kind == "disk":
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
            self._admit(i, t, uid, uses)[inverse] for i, (t, (uid, inverse, uses)) in enumerate(zip(self.tables, per_table))
        ]
        slot_values = torch.cat(remapped).to(self.device) if remapped else values
        pooled = self.tbe(slot_values, offsets)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=pooled)

    def _forward_tt(self, features: KeyedJaggedTensor, per_table) -> KeyedTensor:
        from dlrm.embeddings.tt_kernels import pool, tt_rows

        if not self._tt_filled:
            for t, (uid, _, uses) in zip(self.tables, per_table):
                self._tt_counts[t.name].index_add_(0, uid, uses)
            if self.step >= self.tt_populate_step:
                self._prefill(
                    {n: torch.topk(c, self.base_caps[n]).indices.sort().values for n, c in self._tt_counts.items()}
                )
                self._tt_counts = {}
        values, offsets = features.values(), features.offsets()
        value_start = features.offset_per_key()
        batch = features.stride()
        lengths = (offsets[1:] - offsets[:-1]).to(torch.float32)
        slot_values, tt_blocks, key = [], [], 0
        for i, (t, (uid, inverse, uses)) in enumerate(zip(self.tables, per_table)):
            n = len(t.features)
            c = self.caches[t.name]
            slots = c.slot_of[uid].to(torch.int64)
            hit = slots >= 0
            self._lookups += int(uses.sum())
            self._hits += int(uses[hit].sum())
            if self.policy == "lfu":
                c.score[slots[hit]] += uses[hit].to(torch.float64)
            # Cached ids look up their slot; the others pool a zero row here and come from TT.
            occ_slot = slots[inverse]
            occ_hit = occ_slot >= 0
            slot_values.append(torch.where(occ_hit, occ_slot, 0))
            bag_offsets = offsets[key * batch : (key + n) * batch + 1] - value_start[key]
            cold = (~hit).nonzero().flatten()
            rows = torch.zeros(len(uid), t.dim, device=self.device)
            if len(cold):
                cold_rows = tt_rows(list(self.tt.cores[t.name]), self.tt.shapes[t.name], uid[cold].to(self.device))
                rows = rows.index_put((cold.to(self.device),), cold_rows)
            pooled = pool(rows, inverse.to(self.device), bag_offsets, "sum")
            tt_blocks.extend(pooled.view(n, batch, t.dim).unbind(0) if n > 1 else [pooled])
            # Mask hits of the TBE path: per-sample weights 1 for cached ids, 0 for TT ids.
            slot_values[-1] = (slot_values[-1], occ_hit)
            key += n
        idx = torch.cat([s for s, _ in slot_values]).to(self.device)
        weights = torch.cat([m for _, m in slot_values]).to(self.device, torch.float32)
        cached = self.tbe(idx, offsets, per_sample_weights=weights)
        out = cached + torch.cat(tt_blocks, 1)
        if self.pooling == "mean":
            per_feature = lengths.view(len(self.features), batch).clamp(min=1).t()
            out = out / torch.repeat_interleave(per_feature, torch.tensor(self.dims, device=out.device), dim=1)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=out)

    # ------------------------------------------------------------------ accounting

    def embedding_bytes(self) -> int:
        total = tbe_bytes(self.tbe) + sum(c.map_bytes() for c in self.caches.values())
        if self.store_kind == "tt":
            return total + self.tt.embedding_bytes()
        return total + self.store.resident_bytes()

    def stats(self) -> dict[str, float]:
        steps = max(self._batches, 1)
        return {
            "cache_hit_rate": self._hits / max(self._lookups, 1),
            "cache_evictions_per_step": self._evictions / steps,
            "cache_bytes_moved_per_step": self._bytes_moved / steps,
            "cache_grows": float(self._grows),
        }

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.tt.optimizers() if self.store_kind == "tt" else []

    def describe(self) -> str:
        where = self.store.describe() if self.store is not None else "tt cores"
        return "\n".join(
            f"{t.name}: cached {t.rows} x {t.dim}, {self.base_caps[t.name]} rows cached "
            f"({self.policy}), cold store {where}"
            for t in self.tables
        )


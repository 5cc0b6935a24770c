"""`emb=cached`: hot rows in a fast cache in front of cold rows (issue 6).

    cache.py       HotRowCache: the cache's fused TBE, slot maps, warm start, stats, checkpoints
    slots.py       per-table slot maps, cache sizes, warm-start counts
    write_back.py  WriteBackCache: evicting write-back cache over a Store (emb.store=host|disk)
    store.py       the Store protocol (read rows, write rows, flush, committed step)
    host.py        HostStore: tables in host memory
    disk.py        DiskStore: tables in memory-mapped files (+ journal.py, the undo journal)
    tt_cache.py    TTHotRowCache: TT-Rec's fill-once cache in front of TT cores (emb.store=tt)

Example::

    cfg = OmegaConf.create({"name": "cached", "store": "host", "cache_fraction": 0.01})
    emb = CachedEmbeddings(tables, cfg, optim, cpu)   # a WriteBackCache over a HostStore
    pooled = emb(kjt); ...; emb.flush()
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlrm.embeddings.base import Runtime, TableSpec
from dlrm.embeddings.cached.cache import HotRowCache
from dlrm.embeddings.cached.slots import STORE_KINDS
from dlrm.embeddings.cached.tt_cache import TTHotRowCache
from dlrm.embeddings.cached.write_back import WriteBackCache

# emb.store -> the cache algorithm that serves it.
STORES: dict[str, type[HotRowCache]] = {"host": WriteBackCache, "disk": WriteBackCache, "tt": TTHotRowCache}
assert set(STORES) == set(STORE_KINDS)


class CachedEmbeddings(HotRowCache):
    """The registry's `cached` entry: builds the cache `emb.store` names (`STORES`).

    Constructing it returns a `WriteBackCache` (host, disk) or a `TTHotRowCache` (tt); both are
    HotRowCaches. Raises ValueError naming emb.store for an unknown store."""

    def __new__(
        cls,
        tables: list[TableSpec],
        cfg: DictConfig,
        optim: DictConfig,
        device: torch.device,
        runtime: Runtime | None = None,
    ):
        store = cls.settings(cfg).store  # checked against STORE_KINDS
        return STORES[store](tables, cfg, optim, device, runtime)


__all__ = ["STORES", "CachedEmbeddings", "HotRowCache", "TTHotRowCache", "WriteBackCache"]

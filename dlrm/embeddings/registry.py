"""The registry: `emb.name` -> backend class, a plain dict. Adding a backend is one file plus one
line here (docs/architecture.md walks through it).

`build_embeddings` applies the per-table policy (policy.py): the chosen backend gets the tables
with at least `emb.min_rows` rows (or those in `emb.tables`), the rest stay `full`.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlrm.embeddings.base import EmbeddingBackend, Runtime, TableSpec
from dlrm.embeddings.cached import CachedEmbeddings
from dlrm.embeddings.full import FullEmbeddings
from dlrm.embeddings.hashed import HashedEmbeddings
from dlrm.embeddings.policy import SplitEmbeddings, compressed_tables
from dlrm.embeddings.qr import QREmbeddings
from dlrm.embeddings.tt import TTEmbeddings
from dlrm.options import Opt

BACKENDS: dict[str, type[EmbeddingBackend]] = {
    "full": FullEmbeddings,
    "hashed": HashedEmbeddings,
    "qr": QREmbeddings,
    "tt": TTEmbeddings,
    "cached": CachedEmbeddings,
}


def check_emb_config(cfg: DictConfig) -> None:
    """Check a composed `emb` section before any work: `emb.name` is a known backend and every key
    is one that backend declares (its `options`), with a value of the right type, range or choice.
    Raises ConfigError naming `emb.<key>`; `dlrm.config.validate` calls it."""
    Opt(str, choices=tuple(BACKENDS)).check("emb.name", cfg.name)
    BACKENDS[cfg.name].check_config(cfg)


def build_embeddings(
    tables: list[TableSpec],
    cfg: DictConfig,
    optim: DictConfig,
    device: torch.device,
    runtime: Runtime | None = None,
) -> EmbeddingBackend:
    """The embedding module for `tables` under the `emb` config `cfg` and the `optim.sparse`
    config `optim`: one backend, or a `SplitEmbeddings` of the chosen backend (compressed
    tables) and `full` (the rest). Raises ValueError for an unknown `emb.name`."""
    if cfg.name not in BACKENDS:
        raise ValueError(f"emb.name={cfg.name!r}: known backends are {sorted(BACKENDS)}")
    backend = BACKENDS[cfg.name]
    runtime = runtime or Runtime()
    chosen = tables if backend is FullEmbeddings else compressed_tables(tables, backend.settings(cfg))
    rest = [t for t in tables if t not in chosen]
    parts = []
    if chosen:
        parts.append(backend(chosen, cfg, optim, device, runtime))
    if rest:
        parts.append(FullEmbeddings(rest, _full_settings(cfg), optim, device, runtime))
    return parts[0] if len(parts) == 1 else SplitEmbeddings(parts)


def _full_settings(cfg: DictConfig) -> DictConfig:
    """The keys of `cfg` that `full` reads (the common table keys) for the tables left full."""
    return DictConfig({k: cfg[k] for k in ("dim", "pooling", "check_ids") if k in cfg})

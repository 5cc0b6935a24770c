"""The registry: `emb.name` -> backend class, a plain dict. Adding a backend is one file plus one
line here (docs/architecture.md walks through it).

`build_embeddings` applies the per-table policy (policy.py): the chosen backend gets the tables
with at least `emb.min_rows` rows (or those in `emb.tables`), the rest stay `full`.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlrm.embeddings.base import EmbeddingBackend, Runtime, TableSpec
from dlrm.embeddings.budget import apply_budget
from dlrm.embeddings.cached import CachedEmbeddings
from dlrm.embeddings.full import Fp16Embeddings, FullEmbeddings
from dlrm.embeddings.hashed import HashedEmbeddings
from dlrm.embeddings.hybrid import HybridEmbeddings
from dlrm.embeddings.mde import MDEEmbeddings
from dlrm.embeddings.policy import SplitEmbeddings, compressed_tables
from dlrm.embeddings.qr import QREmbeddings
from dlrm.embeddings.tt import TTEmbeddings
from dlrm.options import Opt

BACKENDS: dict[str, type[EmbeddingBackend]] = {
    "full": FullEmbeddings,
    "fp16": Fp16Embeddings,
    "hashed": HashedEmbeddings,
    "qr": QREmbeddings,
    "tt": TTEmbeddings,
    "cached": CachedEmbeddings,
    "hybrid": HybridEmbeddings,
    "mde": MDEEmbeddings,
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
    check_rows_precision(cfg)
    if cfg.get("budget") is not None:  # the backend's per-table knobs, chosen to fit (budget.py)
        cfg = apply_budget(tables, cfg, optim, backend, runtime)
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
    keys = ("dim", "pooling", "check_ids", "weights_precision")
    out = DictConfig({k: cfg[k] for k in keys if k in cfg})
    if cfg.name == "fp16":  # emb=fp16 stores its tables in fp16; the ones it leaves stay fp32
        out.weights_precision = "fp32"
    return out


# Backends whose own rows are fbgemm rows, so emb.weights_precision applies to them.
ROWS_PRECISION = ("full", "fp16", "hashed", "qr", "hybrid", "mde")


def check_rows_precision(cfg: DictConfig) -> None:
    """A one-line error for emb.weights_precision other than fp32 on a backend that would not honour
    it (tt's cores, cached's cache and store are fp32), rather than silently ignoring it."""
    precision = cfg.get("weights_precision", "fp32")
    if precision != "fp32" and cfg.name not in ROWS_PRECISION:
        raise ValueError(
            f"emb.weights_precision={precision}: emb={cfg.name} keeps its rows in fp32; "
            f"fp16 rows work with {list(ROWS_PRECISION)}"
        )

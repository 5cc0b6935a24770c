"""One builder for the model: tables from cardinalities, the embedding backend, the model around it
(`model.name`: DLRM or DLRM-DCNv2).

Used by `dlrm.train`, the benchmarks in dlrm/bench/ and the tests, so all of them build exactly
what a training run builds.

Example::

    model = build_model(cfg, {"C1": 1460, "C2": 583}, torch.device("cpu"), dense_in=13)
    model.sparse_arch.describe()      # what each table became
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from omegaconf import DictConfig

from dlrm.dcn import DLRMDCN
from dlrm.embeddings import EmbeddingBackend, Runtime, TableSpec, build_embeddings
from dlrm.model import DLRM, interaction_kernel, mlp_kernel, resolve_precision

MODELS = {"dlrm": DLRM, "dcnv2": DLRMDCN}  # model.name -> the model class (conf/model/)


def table_specs(cardinalities: Mapping[str, int], dim: int) -> list[TableSpec]:
    """One table per sparse feature, in the mapping's order: `t_<feature>` of `rows` x `dim`."""
    return [TableSpec(f"t_{f}", int(rows), dim, (f,)) for f, rows in cardinalities.items()]


def build_model(
    cfg: DictConfig,
    cardinalities: Mapping[str, int],
    device: torch.device,
    dense_in: int = 13,
    runtime: Runtime | None = None,
    embeddings: EmbeddingBackend | None = None,
) -> DLRM | DLRMDCN:
    """The `model.name` model (DLRM, DLRM-DCNv2) over the `emb` backend of the composed config `cfg` (sections emb, optim, model,
    trainer.precision), with one table per feature of `cardinalities` ({feature: rows}) and
    `dense_in` dense features. `runtime` carries the run's seed, store dir and whether it resumes
    (default: seed `cfg.seed`, no store dir, not resuming). `embeddings` replaces the backend
    (benchmark baselines). Errors: ValueError / ConfigError for a bad backend setting."""
    if embeddings is None:
        runtime = runtime or Runtime(seed=cfg.seed)
        tables = table_specs(cardinalities, cfg.emb.dim)
        embeddings = build_embeddings(tables, cfg.emb, cfg.optim.sparse, device, runtime)
    towers = dict(
        bottom_mlp=list(cfg.model.bottom_mlp),
        top_mlp=list(cfg.model.top_mlp),
        precision=resolve_precision(cfg.trainer.precision, device),
    )
    if cfg.model.name == "dcnv2":
        towers.update(cross_layers=cfg.model.cross_layers, low_rank=cfg.model.low_rank)
    else:
        kernel = cfg.model.get("kernel", "auto")
        towers.update(
            kernel=interaction_kernel(kernel, device, cfg.emb.dim, len(cardinalities)),
            mlp_kernel=mlp_kernel(kernel, device, towers["precision"]),
        )
    return MODELS[cfg.model.name](embeddings, dense_in=dense_in, **towers)

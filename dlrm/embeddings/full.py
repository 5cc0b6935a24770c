"""`emb=full`: uncompressed tables in fbgemm's batched embedding kernel, optimized fused in backward.

fbgemm's `SplitTableBatchedEmbeddingBagsCodegen` (TBE, the kernel under torchrec's fused tables)
looks up all tables in one call and applies SGD / row-wise Adagrad inside backward, touching only
the rows the batch used. A plain `nn.EmbeddingBag` with a dense optimizer instead writes a
rows-sized gradient every step (benchmarked in docs/benchmarks.md).

We call TBE directly rather than through torchrec's FusedEmbeddingBagCollection: our KJT is
already key-major (the layout TBE wants), so this saves a split/concat per feature, and int64
indices measured faster than the int32 that wrapper converts to (7.6 vs 11.1 ms per step).
"""

from __future__ import annotations

import math

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    BoundsCheckMode,
    ComputeDevice,
    EmbeddingLocation,
    PoolingMode,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import EmbeddingBackend, TableSpec, check_ids_in_range
from dlrm.embeddings.registry import register

# Optimizers fbgemm runs fused on CPU (Adam is GPU-only there).
FUSED_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
}
POOLING = {"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}


def fused_tables(
    tables: list[TableSpec], optim: DictConfig, pooling: str, device: torch.device
) -> SplitTableBatchedEmbeddingBagsCodegen:
    """One fbgemm TBE module for `tables`, weights initialized U(-1/sqrt(rows), 1/sqrt(rows)).

    That init is torchrec's default for EmbeddingBagConfig; raw TBE starts at all zeros.
    Shared by every backend whose tables are plain rows (full, hashed, qr).
    """
    if optim.name not in FUSED_OPTIMIZERS:
        raise ValueError(
            f"optim.sparse.name={optim.name!r}: fused table optimizers are {sorted(FUSED_OPTIMIZERS)}"
        )
    if pooling not in POOLING:
        raise ValueError(f"emb.pooling={pooling!r}: choose one of {sorted(POOLING)}")
    on_cuda = device.type == "cuda"
    location = EmbeddingLocation.DEVICE if on_cuda else EmbeddingLocation.HOST
    compute = ComputeDevice.CUDA if on_cuda else ComputeDevice.CPU
    feature_table_map = [i for i, t in enumerate(tables) for _ in t.features]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(t.rows, t.dim, location, compute) for t in tables],
        feature_table_map=feature_table_map,
        optimizer=FUSED_OPTIMIZERS[optim.name],
        learning_rate=optim.lr,
        eps=optim.get("eps", 1e-8),
        pooling_mode=POOLING[pooling],
        # Range checks happen in check_ids_in_range, which names the feature.
        bounds_check_mode=BoundsCheckMode.NONE,
        device=device,
    )
    with torch.no_grad():
        for t, w in zip(tables, tbe.split_embedding_weights()):
            bound = 1.0 / math.sqrt(t.rows)
            w.uniform_(-bound, bound)
    return tbe


def tbe_bytes(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> int:
    """Weights plus optimizer state held by a TBE module, from the tensors themselves."""
    weights = sum(w.numel() * w.element_size() for w in tbe.split_embedding_weights())
    states = sum(
        s.numel() * s.element_size()
        for per_table in tbe.split_optimizer_states()
        for s in per_table
    )
    return weights + states


class FullEmbeddings(EmbeddingBackend):
    """Uncompressed tables: every id has its own row."""

    name = "full"

    def __init__(
        self, tables: list[TableSpec], cfg: DictConfig, optim: DictConfig, device: torch.device
    ) -> None:
        super().__init__(tables)
        self.check_ids = cfg.get("check_ids", True)
        self.tbe = fused_tables(self.tables, optim, cfg.get("pooling", "sum"), device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        pooled = self.tbe(features.values(), features.offsets())
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=pooled)

    def embedding_bytes(self) -> int:
        return tbe_bytes(self.tbe)


register("full", FullEmbeddings)

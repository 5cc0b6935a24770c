"""`emb=full`: uncompressed tables in fbgemm's batched kernel, optimized fused in backward.

Every id has its own row; the tables are one TBE module (tables.py). Example::

    emb = FullEmbeddings([TableSpec("C3", 1000, 16, ("C3",))], cfg.emb, cfg.optim.sparse, cpu)
    emb(kjt)["C3"].shape        # [B, 16]
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import EmbeddingBackend, Runtime, TableSpec, check_ids_in_range
from dlrm.embeddings.tables import fused_tables, tbe_bytes


class FullEmbeddings(EmbeddingBackend):
    """Uncompressed tables: every id has its own row."""

    name = "full"

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
        self.check_ids = cfg.check_ids
        self.tbe = fused_tables(self.tables, optim, cfg.pooling, device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        pooled = self.tbe(features.values(), features.offsets())
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=pooled)

    def embedding_bytes(self) -> int:
        return tbe_bytes(self.tbe)

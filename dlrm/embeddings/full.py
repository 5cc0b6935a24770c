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
from dlrm.embeddings.policy import POLICY_OPTIONS
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
        self.weights_precision = cfg.weights_precision
        self.tbe = fused_tables(self.tables, optim, cfg.pooling, device, self.weights_precision)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        # our C kernel checks each id against its table as it reads it (table_native.py): the
        # separate pass (0.3 ms a Kaggle batch) runs only to name the feature once one is out
        checked_inside = getattr(self.tbe, "kernel", None) == "native"
        if self.check_ids and not checked_inside:
            check_ids_in_range(features, self.tables)
        try:
            pooled = self.tbe(features.values(), features.offsets())
        except IndexError:
            if checked_inside:
                check_ids_in_range(features, self.tables)  # raises, naming the feature
            raise
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=pooled)

    def embedding_bytes(self) -> int:
        return tbe_bytes(self.tbe)

    def describe(self) -> str:
        if self.weights_precision == "fp32":
            return super().describe()
        return "\n".join(f"{t.name}: {self.name} {t.rows} x {t.dim} {self.weights_precision}" for t in self.tables)


class Fp16Embeddings(FullEmbeddings):
    """`emb=fp16`: `full` with rows stored in fp16 (`emb.weights_precision=fp16`), computed in
    fp32: about half the weight bytes, the 2x baseline every compression method must beat
    (conf/emb/fp16.yaml). Same as `emb=full emb.weights_precision=fp16`, under its own name in
    results.json."""

    name = "fp16"
    options = POLICY_OPTIONS

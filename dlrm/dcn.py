"""DLRM-DCNv2: the classic DLRM with its pairwise dot interaction replaced by a low-rank cross network.

The model of MLPerf Training's recommendation benchmark since v2 (Wang et al. 2021, "DCN V2",
arXiv 2008.13535; torchrec's `DLRM_DCN`). Built from torchrec's `DenseArch`, `LowRankCrossNet` and
`OverArch`:

    dense [B, 13] --DenseArch (bottom MLP)--> [B, D0] --\\
                                                          concat [B, D0 + sum(D_f)] --LowRankCrossNet--> OverArch --> logit [B]
    ids (KJT) --embedding backend--> [B, sum(D_f)] -----/

torchrec's `InteractionDCNArch` concatenates the same way but first reshapes the embeddings to
`[B, F, D]`, which needs every feature's dim equal to the bottom MLP's output. The cross network
itself does not need that, so we concatenate the flat `[B, sum(D_f)]` block: with equal dims the
result is identical (a test checks it against `InteractionDCNArch`), and backends with per-feature
dims (mixed-dimension embeddings) work too.

Example::

    model = DLRMDCN(embeddings, dense_in=13, bottom_mlp=[512, 256, 64, 16], top_mlp=[512, 256, 1],
                    cross_layers=3, low_rank=64)
    logits = model(batch.dense, batch.sparse)      # [B]
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings.base import EmbeddingBackend
from dlrm.model import AMP_DTYPES, DLRM


class DLRMDCN(nn.Module):
    """DLRM-DCNv2 on any embedding backend; same interface as `dlrm.model.DLRM`.

    Args:
        embeddings: the embedding backend (SparseArch); its features may have different dims.
        dense_in: number of dense features (13 for Criteo).
        bottom_mlp: DenseArch layer sizes; the last is the dense block's width D0.
        top_mlp: OverArch layer sizes; the last must be 1 (one click logit).
        cross_layers: number of cross layers (MLPerf: 3).
        low_rank: rank of each cross layer's weight W = U V (MLPerf: 512).
        precision: fp32 | bf16 | fp16: autocast for the MLPs and the cross network; the
            embedding backend stays in fp32 outside autocast.

    Raises:
        ValueError: a bad layer size, rank or precision, naming the config key.
    """

    def __init__(
        self,
        embeddings: EmbeddingBackend,
        dense_in: int,
        bottom_mlp: list[int],
        top_mlp: list[int],
        cross_layers: int = 3,
        low_rank: int = 64,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if top_mlp[-1] != 1:
            raise ValueError(f"model.top_mlp[-1]={top_mlp[-1]} must be 1 (one click logit)")
        if cross_layers < 1 or low_rank < 1:
            raise ValueError(
                f"model.cross_layers={cross_layers} and model.low_rank={low_rank} must be >= 1"
            )
        if precision not in AMP_DTYPES:
            raise ValueError(f"trainer.precision={precision!r}: choose one of {sorted(AMP_DTYPES)}")
        self.amp_dtype = AMP_DTYPES[precision]
        self.sparse_arch = embeddings
        self.dense_arch = DenseArch(dense_in, list(bottom_mlp))
        width = bottom_mlp[-1] + sum(embeddings.dims)  # D0 + sum over features of D_f
        self.crossnet = LowRankCrossNet(in_features=width, num_layers=cross_layers, low_rank=low_rank)
        self.over_arch = OverArch(width, list(top_mlp))
        self.compiled_dense_forward = None  # set by dlrm.compile.enable (trainer.compile)

    dense_parameters = DLRM.dense_parameters  # everything but the embedding backend's

    def dense_forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Everything after the embedding lookup: `dense [B, 13], pooled [B, sum(D_f)] -> logits
        [B]` (fp32). What `trainer.compile` compiles (dlrm/compile.py), as for `DLRM`."""
        with torch.autocast(
            device_type=dense.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            x = torch.cat([self.dense_arch(dense), pooled], dim=1)  # autocast's cat promotes to fp32
            return self.over_arch(self.crossnet(x)).squeeze(1).float()

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """dense `[B, dense_in]`, ids as a KJT -> click logits `[B]` (fp32)."""
        pooled = self.sparse_arch(sparse).values()  # [B, sum(D_f)], fp32
        compiled = self.compiled_dense_forward
        if compiled is not None and self.training:  # training only, as DLRM
            return compiled(dense, pooled)
        return self.dense_forward(dense, pooled)

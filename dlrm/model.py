"""DLRM from torchrec's building blocks, on top of any embedding backend.

    dense [B, 13] --DenseArch (bottom MLP)--> [B, D] --\
                                                         InteractionArch (pairwise dots) --> OverArch (top MLP) --> logit [B]
    ids (KJT) --embedding backend--> [B, F, D] ---------/

The backend runs in fp32 outside autocast (tables and TT cores keep full precision); the MLPs and
the interaction run under autocast when `precision` is bf16/fp16, which is where the FLOPs are.

Example::

    model = DLRM(embeddings, dense_in=13, bottom_mlp=[512, 256, 64, 16], top_mlp=[512, 256, 1])
    logits = model(batch.dense, batch.sparse)      # [B]
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings.base import EmbeddingBackend

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls are fast. Without them (e.g. AVX2-only CPUs) oneDNN
    emulates bf16 and a DLRM step measured 16x slower than fp32 (docs/benchmarks.md)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware runs it natively (CUDA, AMX/AVX512-BF16 CPUs), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


class DLRM(nn.Module):
    def __init__(
        self,
        embeddings: EmbeddingBackend,
        dense_in: int,
        bottom_mlp: list[int],
        top_mlp: list[int],
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        dims = set(embeddings.dims)
        if len(dims) != 1:
            raise ValueError(f"all embedding dims must be equal for the dot interaction, got {dims}")
        (dim,) = dims
        if bottom_mlp[-1] != dim:
            raise ValueError(
                f"model.bottom_mlp[-1]={bottom_mlp[-1]} must equal emb.dim={dim}: the bottom MLP's "
                "output meets the embeddings in the dot interaction"
            )
        if top_mlp[-1] != 1:
            raise ValueError(f"model.top_mlp[-1]={top_mlp[-1]} must be 1 (one click logit)")
        if precision not in AMP_DTYPES:
            raise ValueError(f"trainer.precision={precision!r}: choose one of {sorted(AMP_DTYPES)}")
        self.num_features = len(embeddings.features)
        self.dim = dim
        self.amp_dtype = AMP_DTYPES[precision]
        self.sparse_arch = embeddings
        self.dense_arch = DenseArch(dense_in, list(bottom_mlp))
        self.inter_arch = InteractionArch(num_sparse_features=self.num_features)
        f = self.num_features
        # InteractionArch emits the dense vector plus the (F + 1) choose 2 pairwise dots.
        self.over_arch = OverArch(dim + f + f * (f - 1) // 2, list(top_mlp))

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters for the dense optimizer: everything but the embedding backend's."""
        sparse = {id(p) for p in self.sparse_arch.parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse_arch(sparse).values()  # [B, F * D], fp32
        embedded = pooled.view(-1, self.num_features, self.dim)
        with torch.autocast(
            device_type=dense.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            x = self.inter_arch(self.dense_arch(dense), embedded)
            return self.over_arch(x).squeeze(1).float()

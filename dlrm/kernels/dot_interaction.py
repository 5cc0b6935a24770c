"""DLRM's dot interaction on CPU by our C kernel (interaction.c), as a torch custom op.

`dot_interaction(dense [B, D], sparse [B, F, D]) -> [B, D + (F+1)F/2]`, fp32: each sample's dense
vector, then the strict upper triangle, row-major, of `t t^T` for its F + 1 vectors `t = [dense,
sparse...]` (Naumov et al. 2019): model.DotInteraction's output, in one pass that writes it whole
(no concatenation forward, no slicing of the gradient backward). A custom op (`torch.library`), so
`trainer.compile` keeps it as one opaque call with its own backward rather than tracing into
ctypes. What `model.kernel` chooses (model.py: `interaction_kernel`).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from dlrm.kernels.build import I32, I64, SOURCES, P, load, ptr

MAX_VECTORS = 32  # interaction.c's NMAX: its vector path takes F + 1 <= 32 (and D a multiple of 16)
SIGNATURES = {  # name: (argument types, return type), as declared in interaction.c
    "dot_forward": ([P, P, I64, I64, I64, P, I32, I32], None),
    "dot_backward": ([P, P, P, I32, I64, I64, I64, P, P, I32], None),
}


@cache
def library() -> ctypes.CDLL:
    """interaction.c compiled and loaded (dlrm/kernels/build.py). Raises NativeKernelError."""
    return load(SOURCES / "interaction.c", SIGNATURES)


def _width(sparse: torch.Tensor) -> int:
    """D + (F+1)F/2: the output's columns."""
    _, f, d = sparse.shape
    return d + (f + 1) * f // 2


@torch.library.custom_op("dlrm::dot_interaction", mutates_args=())
def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """`[B, D], [B, F, D]` fp32 CPU -> `[B, D + (F+1)F/2]`, computed in fp32 and stored in fp32, or
    in bf16 with `bf16` (what the top MLP reads under bf16 autocast: the same values as casting
    the fp32 output, round to nearest even, without a second pass)."""
    dense, sparse = dense.contiguous(), sparse.contiguous()
    b, f, d = sparse.shape
    out = dense.new_empty(b, _width(sparse), dtype=torch.bfloat16 if bf16 else torch.float32)
    library().dot_forward(ptr(dense), ptr(sparse), b, f, d, ptr(out), int(bf16), torch.get_num_threads())
    return out


@dot_interaction.register_fake
def _(dense: torch.Tensor, sparse: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    return dense.new_empty(sparse.shape[0], _width(sparse), dtype=torch.bfloat16 if bf16 else torch.float32)


@torch.library.custom_op("dlrm::dot_interaction_backward", mutates_args=())
def dot_interaction_backward(
    dense: torch.Tensor, sparse: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients `[B, D], [B, F, D]` (fp32) of `dot_interaction(dense, sparse)` for `grad [B, D
    + pairs]` (fp32 or bf16): `grad t_i = sum over j != i of grad[pair(i, j)] t_j`, plus grad's
    first D columns for the dense vector."""
    dense, sparse, grad = dense.contiguous(), sparse.contiguous(), grad.contiguous()
    if grad.dtype not in (torch.float32, torch.bfloat16):
        grad = grad.float()
    b, f, d = sparse.shape
    g_dense, g_sparse = torch.empty_like(dense), torch.empty_like(sparse)
    library().dot_backward(
        ptr(dense), ptr(sparse), ptr(grad), int(grad.dtype == torch.bfloat16), b, f, d, ptr(g_dense), ptr(g_sparse),
        torch.get_num_threads(),
    )
    return g_dense, g_sparse


@dot_interaction_backward.register_fake
def _(dense: torch.Tensor, sparse: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(dense), torch.empty_like(sparse)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:2])


def _backward(ctx, grad: torch.Tensor):
    dense, sparse = ctx.saved_tensors
    return (*dot_interaction_backward(dense, sparse, grad), None)


dot_interaction.register_autograd(_backward, setup_context=_setup_context)

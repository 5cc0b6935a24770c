"""torchrec's Perceptron (a Linear, then ReLU) with its backward's mask and bias sum in C (mlp.c).

`linear_relu(x [B, K], weight [N, K], bias [N], bf16) -> relu(x W^T + b) [B, N]`. Forward is
PyTorch's `addmm`, then the ReLU in place (no second `[B, N]` tensor); backward masks the incoming
gradient and sums the bias gradient in one C pass (`relu_backward`, a `torch.library` custom op,
so `trainer.compile` keeps it whole), then PyTorch's two GEMMs. Autograd instead wrote the masked
gradient (threshold_backward) and read it again for the bias (sum). In fp32 the trainer's step
measured 5-7% faster on held batches and ~0.5 ms (1.5%) in default runs; under bf16 autocast,
where each pass moves half the bytes, the saving did not cover the Python of one more autograd
Function per layer (docs/benchmarks.md, "The MLPs' ReLU backward in C"), so `model.kernel=auto`
uses it for fp32 only (model.py: `mlp_kernel`).

Values: forward is autocast's (bf16: x, W and b cast to bf16, as autocast casts them for addmm);
the gradients are autograd's but for the bias gradient's summation order (fp32 blocks of 256 rows;
under bf16 it stays fp32, where autograd rounded it to bf16).

`fuse_perceptrons` swaps `FusedPerceptron`s into a built DenseArch/OverArch: same Linear modules,
so the same parameters and state_dict keys.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
from torch import nn
from torchrec.modules.mlp import Perceptron

from dlrm.kernels.build import I32, I64, SOURCES, P, load, ptr

BLOCK = 256  # mlp.c's rows per partial sum of the bias gradient
SIGNATURES = {  # name: (argument types, return type), as declared in mlp.c
    "relu_backward": ([P, P, P, P, P, I64, I64, I32, I32], None),
}


@cache
def library() -> ctypes.CDLL:
    """mlp.c compiled and loaded (dlrm/kernels/build.py). Raises NativeKernelError."""
    return load(SOURCES / "mlp.c", SIGNATURES)


@torch.library.custom_op("dlrm::relu_backward", mutates_args=())
def relu_backward(grad: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For `y = relu(z)` `[B, N]` (fp32 or bf16, CPU) and `grad` its gradient: `(grad * (y > 0)`
    `[B, N]` in y's dtype, the gradient of z, `and its sum over rows [N] fp32)`, the gradient of
    a bias added into z."""
    grad = grad.to(y.dtype).contiguous()
    b, n = y.shape
    g, gbias = torch.empty_like(grad), y.new_empty(n, dtype=torch.float32)
    partial = y.new_empty(-(-b // BLOCK), n, dtype=torch.float32)
    library().relu_backward(
        ptr(grad), ptr(y), ptr(g), ptr(gbias), ptr(partial), b, n, int(y.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return g, gbias


@relu_backward.register_fake
def _(grad: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(y), y.new_empty(y.shape[1], dtype=torch.float32)


class _LinearReLU(torch.autograd.Function):
    # No autocast context switching in here (~10 us of Python each): the inputs are cast
    # explicitly, so autocast, if on, finds them in its dtype already and casts nothing.
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bf16: bool) -> torch.Tensor:
        dtype = torch.bfloat16 if bf16 else torch.float32
        xc, wc = x.to(dtype), weight.to(dtype)  # autocast's casts for addmm (none in fp32)
        y = torch.addmm(bias.to(dtype), xc, wc.t()).relu_()
        ctx.save_for_backward(xc, wc, y)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xc, wc, y = ctx.saved_tensors
        g, gbias = relu_backward(grad, y)
        gx = torch.mm(g, wc).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = torch.mm(g.t(), xc).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, gbias if ctx.needs_input_grad[2] else None, None


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """`relu(x [B, K] @ weight [N, K]^T + bias [N])` -> `[B, N]`, on CPU: fp32 (x, weight and
    bias fp32), or computed and returned in bf16 with `bf16` (as under bf16 autocast)."""
    return _LinearReLU.apply(x, weight, bias, bf16)


class FusedPerceptron(nn.Module):
    """A torchrec `Perceptron` whose activation is ReLU, through `linear_relu`: it holds the same
    `_linear` module (same parameters, same state_dict keys). Under autocast other than bf16
    (fp16), or for inputs other than `[B, K]`, it runs the Perceptron's own ops."""

    def __init__(self, perceptron: Perceptron) -> None:
        super().__init__()
        self._linear = perceptron._linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cpu")
        bf16 = autocast and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if x.dim() != 2 or x.device.type != "cpu" or (autocast and not bf16):
            return torch.relu(self._linear(x))
        return linear_relu(x, self._linear.weight, self._linear.bias, bf16)


def fuse_perceptrons(module: nn.Module) -> int:
    """Replace, in place, every torchrec `Perceptron` under `module` whose activation is ReLU and
    whose Linear has a bias with a `FusedPerceptron` over the same Linear; returns how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Perceptron) and child._activation_fn is torch.relu and child._linear.bias is not None:
                setattr(parent, name, FusedPerceptron(child))
                swapped += 1
    return swapped

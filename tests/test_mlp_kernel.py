"""The MLPs' ReLU layers through our C kernel (model.kernel, dlrm/kernels/linear_relu.py) against
torchrec's Perceptron: same forward, same gradients (the bias gradient up to summation order)."""

from __future__ import annotations

import logging

import pytest
import torch
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.modules.mlp import Perceptron

from dlrm.kernels.linear_relu import FusedPerceptron, fuse_perceptrons, relu_backward
from dlrm.model import mlp_kernel
from dlrm.options import ConfigError

CPU = torch.device("cpu")


def _pair(k: int, n: int, seed: int = 0) -> tuple[Perceptron, FusedPerceptron]:
    torch.manual_seed(seed)
    ref = Perceptron(k, n)
    fused = Perceptron(k, n)
    fused.load_state_dict(ref.state_dict())
    return ref, FusedPerceptron(fused)


def _run(layer, x, grad, bf16: bool):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    y.backward(grad.to(y.dtype))
    lin = layer._linear
    return y, x.grad, lin.weight.grad, lin.bias.grad


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("b, k, n", [(300, 13, 512), (2048, 367, 256), (5, 7, 3)])
def test_matches_torchrecs_perceptron(bf16, b, k, n):
    ref, fused = _pair(k, n)
    x, grad = torch.randn(b, k), torch.randn(b, n)
    y0, gx0, gw0, gb0 = _run(ref, x, grad, bf16)
    y1, gx1, gw1, gb1 = _run(fused, x, grad, bf16)
    assert y1.dtype == y0.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(y1, y0)  # the same addmm and ReLU: the same bits
    assert torch.equal(gx1, gx0)
    torch.testing.assert_close(gw1, gw0, rtol=0, atol=0) if not bf16 else torch.testing.assert_close(gw1, gw0)
    assert gb1.dtype == torch.float32
    # the bias gradient: fp32 sums in 256-row blocks (autograd's bf16 path rounds its sum to bf16)
    torch.testing.assert_close(gb1, gb0, rtol=1e-5 if not bf16 else 1e-2, atol=1e-4 if not bf16 else 1e-2)


def test_relu_backward_masks_like_threshold_backward_nan_and_empty_included():
    y = torch.tensor([[1.0, 0.0, -2.0, float("nan")], [3.0, -0.0, 0.5, 2.0]])
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    g, gbias = relu_backward(grad, y)
    assert torch.equal(g, torch.ops.aten.threshold_backward(grad, y, 0))
    assert torch.equal(gbias, g.sum(0))
    g, gbias = relu_backward(torch.zeros(0, 4), torch.zeros(0, 4))  # a rank's empty eval batch
    assert g.shape == (0, 4) and torch.equal(gbias, torch.zeros(4))


def test_the_kernel_gives_the_same_bits_on_one_or_two_threads_and_the_layer_compiles():
    torch.manual_seed(1)
    y, grad = torch.randn(1000, 128).relu(), torch.randn(1000, 128)  # 4 blocks of 256 rows, the last short
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(relu_backward(grad, y))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # a custom op inside an autograd Function: torch.compile traces the layer whole, backward included
    x, grad = torch.randn(300, 64), torch.randn(300, 128)
    _, fused = _pair(64, 128)
    eager = [t.clone() for t in _run(fused, x, grad, False)]
    fused._linear.zero_grad()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    for a, b in zip(_run(compiled, x, grad, False), eager):
        torch.testing.assert_close(a, b)


def test_fusing_keeps_the_towers_parameters_and_state_dict_keys():
    dense, over = DenseArch(13, [512, 256, 64, 16]), OverArch(367, [512, 256, 1])
    keys = list(dense.state_dict()) + list(over.state_dict())
    params = [id(p) for p in (*dense.parameters(), *over.parameters())]
    assert fuse_perceptrons(dense) == 4 and fuse_perceptrons(over) == 2  # OverArch's last Linear: no ReLU
    assert list(dense.state_dict()) + list(over.state_dict()) == keys
    assert [id(p) for p in (*dense.parameters(), *over.parameters())] == params
    assert fuse_perceptrons(dense) == 0  # nothing left to swap


def test_model_kernel_choice_for_the_mlps_and_its_errors():
    cuda = torch.device("cuda")
    assert mlp_kernel("auto", CPU, "fp32") == "native"
    assert mlp_kernel("auto", CPU, "bf16") == "torch"  # measured no faster under bf16
    assert mlp_kernel("native", CPU, "bf16") == "native"
    assert mlp_kernel("torch", CPU, "fp32") == "torch" and mlp_kernel("auto", cuda, "fp32") == "torch"
    assert mlp_kernel("native", CPU, "fp16") == "torch"  # fp16 autocast: FusedPerceptron would run torch's ops
    with pytest.raises(ConfigError, match=r"^model.kernel='fast': choose one of \['auto', 'native', 'torch'\]$"):
        mlp_kernel("fast", CPU, "fp32")
    with pytest.raises(ConfigError, match=r"^model.kernel=native runs on CPU, not cuda"):
        mlp_kernel("native", cuda, "fp32")


def test_without_a_compiler_auto_warns_once_and_native_is_one_line(no_compiler, caplog):
    with caplog.at_level(logging.WARNING, logger="dlrm.kernels.build"):
        assert mlp_kernel("auto", CPU, "fp32") == "torch"
        assert mlp_kernel("auto", CPU, "fp32") == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        (
            "model.kernel=auto: the MLPs' ReLU backward runs PyTorch ops (slower on CPU): "
            "no C compiler ('no-such-cc' not on PATH; set $CC) to build mlp.c"
        )
    ]
    with pytest.raises(ConfigError, match=r"^model.kernel=native: no C compiler .*; model.kernel=torch"):
        mlp_kernel("native", CPU, "fp32")

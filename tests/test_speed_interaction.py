"""DotInteraction (PyTorch ops and our C kernel, model.kernel) against torchrec's InteractionArch:
same values, same gradients, same order."""

from __future__ import annotations

import logging

import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from dlrm.model import DotInteraction, interaction_kernel
from dlrm.options import ConfigError

KERNELS = ["torch", "native"]
# (features, dim): the C kernel's scalar path (dim not a multiple of 16) and its vector path
SHAPES = [(5, 3), (26, 16), (4, 32), (31, 16)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("f, d", SHAPES)
def test_matches_torchrec_values_and_gradients(kernel, f, d):
    torch.manual_seed(0)
    b = 7
    dense = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(b, f, d, dtype=torch.float64, requires_grad=True)
    ref = InteractionArch(f)(dense, sparse)
    # computes in fp32: compare on fp64 inputs cast down, with fp32 tolerance
    ours = DotInteraction(f, kernel)(dense, sparse)
    assert ours.shape == ref.shape == (b, d + (f + 1) * f // 2)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (dense, sparse), g)
    got = torch.autograd.grad(ours, (dense, sparse), g.float())
    for a, w in zip(got, want):
        assert a.dtype == torch.float64  # gradients come back in the inputs' dtype
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_inputs_under_autocast_dots_in_fp32(kernel):
    """Under bf16 autocast the dots are computed in fp32; the C kernel stores them as bf16 (the
    top MLP's input: exactly autocast's cast of the fp32 output) and takes the bf16 gradient."""
    torch.manual_seed(1)
    dense = torch.randn(64, 16).bfloat16().requires_grad_()
    sparse = torch.randn(64, 3, 16, requires_grad=True)
    inter = DotInteraction(3, kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = inter(dense, sparse)
    fp32 = inter(dense.detach().float(), sparse.detach())
    torch.testing.assert_close(fp32, InteractionArch(3)(dense.detach().float(), sparse.detach()))
    if kernel == "torch":
        assert out.dtype == torch.float32 and torch.equal(out, fp32)
        return
    assert out.dtype == torch.bfloat16 and torch.equal(out, fp32.bfloat16())
    grad = torch.randn(out.shape).bfloat16()
    out.backward(grad)
    x, y = dense.detach().float().requires_grad_(), sparse.detach().clone().requires_grad_()
    inter(x, y).backward(grad.float())  # the same gradient, widened: the same arithmetic
    assert torch.equal(sparse.grad, y.grad) and torch.equal(dense.grad, x.grad.bfloat16())


def test_gradcheck():
    f, d = 3, 2
    dense = torch.randn(2, d, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(2, f, d, dtype=torch.float64, requires_grad=True)
    inter = DotInteraction(f)

    def fn(x, y):  # DotInteraction computes in fp32; check the fp64 math of its backward here
        from dlrm.model import _PairwiseDots

        t = torch.cat([x.unsqueeze(1), y], 1)
        return torch.cat([x, _PairwiseDots.apply(t, inter.flat_index, inter.sym_index)], 1)

    assert torch.autograd.gradcheck(fn, (dense, sparse))


@pytest.mark.parametrize("kernel", KERNELS)
def test_an_empty_batch_passes_through(kernel):
    # a rank's padded eval batch has B = 0 (dlrm/distributed): the interaction must not fail on it
    out = DotInteraction(3, kernel)(torch.zeros(0, 16), torch.zeros(0, 3, 16))
    assert out.shape == (0, 16 + 6)


def test_the_c_kernel_gives_the_same_bits_on_one_or_two_threads_and_compiles():
    torch.manual_seed(2)
    dense, sparse = torch.randn(300, 16), torch.randn(300, 26, 16)
    grad = torch.randn(300, 16 + 351)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x, y = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
            out = DotInteraction(26, "native")(x, y)
            out.backward(grad)
            results.append((out, x.grad, y.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # a custom op: torch.compile keeps it whole (fake tensors give shapes), with its backward
    inter = DotInteraction(26, "native")
    compiled = torch.compile(inter, backend="aot_eager", fullgraph=True)
    x, y = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
    out = compiled(x, y)
    out.backward(grad)
    torch.testing.assert_close(out, results[0][0])
    torch.testing.assert_close(y.grad, results[0][2])


def test_model_kernel_choice_and_its_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert interaction_kernel("auto", cpu, 16, 26) == "native"
    assert interaction_kernel("auto", cpu, 24, 26) == "torch"  # no vector path: PyTorch's is faster
    assert interaction_kernel("auto", cpu, 16, 40) == "torch"
    assert interaction_kernel("native", cpu, 24, 26) == "native"  # asked for: the scalar path
    assert interaction_kernel("auto", cuda) == "torch" and interaction_kernel("torch", cpu) == "torch"
    with pytest.raises(ConfigError, match=r"^model.kernel='fast': choose one of \['auto', 'native', 'torch'\]$"):
        interaction_kernel("fast", cpu)
    with pytest.raises(ConfigError, match=r"^model.kernel=native runs on CPU, not cuda"):
        interaction_kernel("native", cuda)


def test_without_a_compiler_auto_warns_once_and_native_is_one_line(no_compiler, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="dlrm.kernels.build"):
        assert interaction_kernel("auto", cpu) == "torch"
        assert interaction_kernel("auto", cpu) == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        (
            "model.kernel=auto: the dot interaction runs PyTorch ops (slower on CPU): "
            "no C compiler ('no-such-cc' not on PATH; set $CC) to build interaction.c"
        )
    ]
    with pytest.raises(ConfigError, match=r"^model.kernel=native: no C compiler .*; model.kernel=torch"):
        interaction_kernel("native", cpu)

"""DotInteraction against torchrec's InteractionArch: same values, same gradients, same order."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import InteractionArch

from dlrm.model import DotInteraction


def test_matches_torchrec_values_and_gradients():
    torch.manual_seed(0)
    f, d, b = 5, 3, 7
    dense = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(b, f, d, dtype=torch.float64, requires_grad=True)
    ref = InteractionArch(f)(dense, sparse)
    # computes in fp32: compare on fp64 inputs cast down, with fp32 tolerance
    ours = DotInteraction(f)(dense, sparse)
    assert ours.shape == ref.shape == (b, d + (f + 1) * f // 2)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (dense, sparse), g)
    got = torch.autograd.grad(ours, (dense, sparse), g.float())
    for a, w in zip(got, want):
        assert a.dtype == torch.float64  # gradients come back in the inputs' dtype
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_under_autocast_give_fp32_dots():
    torch.manual_seed(1)
    dense = torch.randn(4, 2).bfloat16()
    sparse = torch.randn(4, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DotInteraction(3)(dense, sparse)
    assert out.dtype == torch.float32
    ref = InteractionArch(3)(dense.float(), sparse)
    torch.testing.assert_close(out, ref)


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


def test_an_empty_batch_passes_through():
    # a rank's padded eval batch has B = 0 (dlrm/distributed): the interaction must not fail on it
    out = DotInteraction(num_sparse_features=3)(torch.zeros(0, 4), torch.zeros(0, 3, 4))
    assert out.shape == (0, 4 + 6)

"""The reference-style baseline of `scripts/bench.py --vs-reference`: shapes, sparse SGD, layout."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import InteractionArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.bench.reference import ReferenceDLRM, ReferenceStep, compare, reference_inputs

CARDS = [10, 7, 5]


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, c, (b,), generator=g) for c in CARDS])
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=ids, offsets=torch.arange(len(CARDS) * b + 1), stride=b)
    return torch.rand(b, 13, generator=g), kjt, (torch.rand(b, generator=g) < 0.5).float()


def test_inputs_are_per_table_indices_and_offsets():
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 1, 0, 2]))
    (ia, oa), (ib, ob) = reference_inputs(kjt, 2)
    assert ia.tolist() == [1, 2, 3] and oa.tolist() == [0, 2]
    assert ib.tolist() == [4, 5] and ob.tolist() == [0, 0]


def test_forward_is_a_probability_and_the_interaction_is_the_dot_triangle():
    torch.manual_seed(0)
    model = ReferenceDLRM(CARDS, dim=4, bottom=[13, 8, 4], top=[8, 1])
    dense, kjt, _ = batch()
    p = model(dense, reference_inputs(kjt, 3))
    assert p.shape == (4,) and bool(((p > 0) & (p < 1)).all())
    # the same pairwise dots as torchrec's (lower vs upper triangle: same set, other order)
    x = model.bot(dense)
    ly = torch.stack([bag(i, o) for bag, (i, o) in zip(model.emb, reference_inputs(kjt, 3))], 1)
    t = torch.cat([x.unsqueeze(1), ly], 1)
    ours = torch.bmm(t, t.transpose(1, 2))[:, model.li, model.lj]
    theirs = InteractionArch(3)(x, ly)[:, 4:]
    torch.testing.assert_close(ours.sort(1).values, theirs.sort(1).values)


def test_step_uses_sparse_gradients_and_updates_only_used_rows():
    torch.manual_seed(0)
    model = ReferenceDLRM(CARDS, dim=4, bottom=[13, 8, 4], top=[8, 1])
    step = ReferenceStep(model, lr=0.5)
    dense, kjt, labels = batch()
    before = [bag.weight.detach().clone() for bag in model.emb]
    loss = step(dense, reference_inputs(kjt, 3), labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(bag.weight.grad.is_sparse for bag in model.emb)
    used = kjt.values().view(3, -1)
    for t, bag in enumerate(model.emb):
        changed = (bag.weight.detach() != before[t]).any(1).nonzero().flatten()
        assert set(changed.tolist()) <= set(used[t].tolist()) and len(changed) > 0


def test_compare_interleaves_and_reports_the_ratio():
    batches = [batch(seed=s) for s in range(4)]
    seen = []
    r = compare(lambda b: seen.append(len(b)), batches, 0.1, 4, [8, 4], [8, 1], CARDS, warmup=1)
    assert seen == [4, 4, 4, 4] and r["pairs"] == 3
    assert r["ratio"] > 0 and r["reference_ms"] >= r["reference_min_ms"] > 0


def test_gemm_floor_times_every_linear_layer(monkeypatch):
    """The floor runs forward + both backward GEMMs for each nn.Linear, in the asked precision."""
    from dlrm.bench import vs_reference

    calls = []
    real_mm = torch.mm

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape), a.dtype))
        return real_mm(a, b)

    monkeypatch.setattr(vs_reference.torch, "mm", spy)
    model = torch.nn.Sequential(torch.nn.Linear(13, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    ms = vs_reference.gemm_floor_ms(model, 4, "bf16", reps=1)
    assert ms > 0
    per_rep = calls[:6]
    assert per_rep == [
        ((4, 13), (13, 8), torch.bfloat16), ((4, 8), (8, 13), torch.bfloat16), ((8, 4), (4, 13), torch.bfloat16),
        ((4, 8), (8, 1), torch.bfloat16), ((4, 1), (1, 8), torch.bfloat16), ((1, 4), (4, 8), torch.bfloat16),
    ]
    assert len(calls) == 6 * 4  # 1 timed rep + 3 warm-up reps

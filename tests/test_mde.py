"""emb=mde: frequency blocks and widths, exact forward/backward against a hand-built reference,
bytes, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.mde import block_bounds, block_dims
from dlrm.embeddings.tables import tbe_bytes
from dlrm.train import run

CPU = torch.device("cpu")
SGD = OmegaConf.create({"name": "sgd", "lr": 0.5})
TABLES = [TableSpec("t_C1", 1000, 8, ("C1",)), TableSpec("t_C2", 300, 8, ("C2",))]


def kjt(bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = list(bags)
    values = [i for k in keys for bag in bags[k] for i in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths)
    )


@pytest.fixture
def counts_dir(tmp_path):
    rng = np.random.default_rng(0)
    for t in TABLES:
        np.save(tmp_path / f"{t.features[0]}.npy", rng.zipf(1.3, t.rows).clip(max=10**6))
    return tmp_path


def build(counts_dir=None, **kw):
    cfg = OmegaConf.create({"name": "mde", "dim": 8, "min_rows": 0, "counts": counts_dir, **kw})
    return build_embeddings(TABLES, cfg, SGD, CPU)


def reference_route(emb, t: TableSpec, counts: np.ndarray, x: int) -> tuple[int, int]:
    """(block, row) of id x by hand: ranks by count (ties: lower id), blocks of emb.block_rows
    sizes in rank order, head rows numbered by sorted id, the last block indexed by the id."""
    ranked = sorted(range(t.rows), key=lambda i: (-counts[i], i))
    start = 0
    for k, n in enumerate(emb.block_rows[t.name][:-1]):
        block = sorted(ranked[start : start + n])
        if x in block:
            return k, block.index(x)
        start += n
    return len(emb.block_rows[t.name]) - 1, x


def test_blocks_and_power_rule():
    assert block_bounds(1_000_000, 4) == [0, 32, 1000, 31623, 1_000_000]
    assert block_bounds(3, 4) == [0, 2, 3] and block_bounds(5, 1) == [0, 5]
    assert block_dims([1e-2, 1e-4, 1e-6], 16, 0.3, 1.0, 4) == [16, 4, 4]  # 16, 4.0, 1.0 rounded to 4s
    assert block_dims([1.0, 0.5 ** (1 / 0.5)], 16, 0.5, 1.0, 4) == [16, 8]


@pytest.mark.parametrize(
    "pooling, dims, merged",
    [
        ("sum", {"C1": [8, 4, 4, 4], "C2": [8, 8, 4, 4]}, {"t_C1": [8, 4], "t_C2": [8, 4]}),
        ("mean", {"C1": [8, 4, 4, 4], "C2": [8, 8, 4, 4]}, {"t_C1": [8, 4], "t_C2": [8, 4]}),
        # C2 all full width (no head ids, no projection), in one fused table with C1's head
        ("sum", {"C1": [8, 8, 8, 4], "C2": [8, 8, 8, 8]}, {"t_C1": [8, 4], "t_C2": [8]}),
    ],
)
def test_forward_and_backward_equal_hand_built_reference(counts_dir, pooling, dims, merged):
    emb = build(str(counts_dir), pooling=pooling, dims=dims)
    assert emb.block_dims == merged  # equal neighbours merged
    assert emb.block_rows["t_C1"][0] == (6 if dims["C1"][1] == 4 else 178)  # 1000^(1/4), 1000^(3/4)
    assert len(merged["t_C2"]) == 1 or emb.block_rows["t_C2"][0] == 18  # 300^(2/4)
    with torch.no_grad():  # projections away from their [I | 0] init, so they matter
        for p in emb.projections.values():
            p.add_(torch.randn_like(p) * 0.3)
    bags = {"C1": [[0, 7, 999], [7], [500, 3], []], "C2": [[299], [1, 2], [5, 5, 6], [0]]}
    counts = {t.name: np.load(counts_dir / f"{t.features[0]}.npy") for t in TABLES}
    weights = [w.clone() for t in TABLES for w in emb.block_weights(t.name)]
    proj = {n: p.detach().clone() for n, p in emb.projections.items()}
    out = emb(kjt(bags))
    grad = torch.randn_like(out.values())
    out.values().backward(grad)
    new_weights = [w for t in TABLES for w in emb.block_weights(t.name)]
    first = 0
    for i, (t, f) in enumerate(zip(TABLES, ("C1", "C2"))):
        dims = emb.block_dims[t.name]
        narrow = [d if d < 8 else 0 for d in dims]  # full-width blocks are not projected
        starts = np.cumsum([0] + narrow)
        expected_w = [weights[first + k].clone() for k in range(len(dims))]
        if not any(narrow):
            assert t.name not in proj
        expected_pgrad = torch.zeros_like(proj.get(t.name, torch.zeros(0, 8)))
        assert expected_pgrad.shape == (sum(narrow), 8)
        for b, bag in enumerate(bags[f]):
            scale = 1.0 / max(len(bag), 1) if pooling == "mean" else 1.0
            want = torch.zeros(8)
            g = grad[b, 8 * i : 8 * i + 8]
            for x in bag:
                k, r = reference_route(emb, t, counts[t.name], x)
                p_k = proj[t.name][starts[k] : starts[k + 1]] if narrow[k] else torch.eye(8)
                row = weights[first + k][r]
                want += scale * row @ p_k
                expected_w[k][r] -= 0.5 * scale * (p_k @ g)
                if narrow[k]:
                    expected_pgrad[starts[k] : starts[k + 1]] += scale * torch.outer(row, g)
            torch.testing.assert_close(out[f][b], want)
        for k in range(len(dims)):
            torch.testing.assert_close(new_weights[first + k], expected_w[k])
        if any(narrow):
            torch.testing.assert_close(emb.projections[t.name].grad, expected_pgrad)
        first += len(dims)


def test_full_width_blocks_are_a_plain_table():
    emb = build(dims={"C1": [8, 8, 8, 8], "C2": [8, 8, 8, 8]})
    assert emb.block_rows == {"t_C1": [1000], "t_C2": [300]} and len(emb.head_row) == 0
    out = emb(kjt({"C1": [[3], [999]], "C2": [[0], [299]]}))
    (w1,), (w2,) = emb.block_weights("t_C1"), emb.block_weights("t_C2")
    torch.testing.assert_close(out.values(), torch.cat([w1[[3, 999]], w2[[0, 299]]], 1))


def test_embedding_bytes_count_every_tensor(counts_dir):
    emb = build(str(counts_dir))
    opt = emb.optimizers()[0]
    tables = sum(tbe_bytes(m) for m in emb.width_tables)
    heads = sum(n for t in TABLES for n in emb.block_rows[t.name][:-1])
    words = sum(-(-t.rows // 32) for t in TABLES if len(emb.block_rows[t.name]) > 1)
    assert len(emb.head_row) == heads and len(emb.head_bits) == words
    expected = tables + 8 * words + 5 * heads  # int32 bits and rank per word, int32 row + int8 group per head id
    for p in emb.projections.values():
        expected += p.numel() * 4 + sum(s.numel() * s.element_size() for s in opt.state[p].values())
    assert emb.embedding_bytes() == expected
    rows = sum(n * (d + 1) for t in TABLES for n, d in zip(emb.block_rows[t.name], emb.block_dims[t.name]))
    assert tables == sum(
        n * d * 4 for t in TABLES for n, d in zip(emb.block_rows[t.name], emb.block_dims[t.name])
    )  # SGD: no state
    assert rows > 0


def test_bad_settings_name_the_key(counts_dir):
    with pytest.raises(ValueError, match="emb.min_dim=3"):
        build(min_dim=3)
    with pytest.raises(ValueError, match=r"emb.dims.C1=\[8, 6\]"):
        build(dims={"C1": [8, 6]})
    with pytest.raises(ValueError, match=r"emb.dims.C1=\[8, 4, 8, 4\]: .*narrow"):
        build(dims={"C1": [8, 4, 8, 4]})
    with pytest.raises(ValueError, match="emb.alpha=0"):
        build(alpha=0)


def test_mde_trains(compose_cfg, tiny_dataset, tmp_path):
    results = run(compose_cfg("emb=mde", "emb.min_rows=500", "trainer.max_steps=60"), tmp_path)
    assert results["auc"] > 0.6 and results["compression_ratio"] > 1.2

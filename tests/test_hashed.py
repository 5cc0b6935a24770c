"""emb=hashed and emb=qr: hash quality and determinism, exact QR math, bytes, fused updates, bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.full import FullEmbeddings
from dlrm.embeddings.hashed import (
    PRIME,
    HashedEmbeddings,
    collision_stats,
    hash_coefficients,
    universal_hash,
)
from dlrm.embeddings.qr import QREmbeddings, remainder_size
from dlrm.embeddings.registry import SplitEmbeddings

CPU = torch.device("cpu")
SGD = OmegaConf.create({"name": "sgd", "lr": 0.5})
ADAGRAD = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
ROOT = Path(__file__).resolve().parents[1]


def emb_cfg(**kw):
    return OmegaConf.create({"dim": 8, "pooling": "sum", "check_ids": True, "compression": 4, **kw})


def kjt(bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """Key-major KJT from {feature: [bag of ids per sample]}."""
    keys = list(bags)
    values = [i for k in keys for bag in bags[k] for i in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths)
    )


def single_hot(ids: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    keys = list(ids)
    values = torch.cat([ids[k] for k in keys])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=torch.ones_like(values))


# ----------------------------------------------------------------------------- the hash


def reference_hash(x: int, coeffs: list[int], buckets: int) -> int:
    """Python big ints: no overflow possible. Limbs of the id's 64-bit two's complement."""
    u = x % 2**64
    limbs = [u & (2**30 - 1), (u >> 30) & (2**30 - 1), u >> 60]
    a0, a1, a2, b = coeffs
    return (a0 * limbs[0] + a1 * limbs[1] + a2 * limbs[2] + b) % PRIME % buckets


def test_prime_is_prime():
    assert 2**31 < PRIME < 2**32 and all(PRIME % d for d in range(2, math.isqrt(PRIME) + 1))


def test_hash_is_exact_for_ids_beyond_int32():
    ids = [0, 1, 2**31 - 1, 2**31, 4_000_000_000, 2**32 + 7, 2**40 + 3, 2**62 + 5, 2**63 - 1, -1, -(2**63)]
    for seed in (0, 1):
        coeffs = hash_coefficients(seed, "t_C3")
        got = universal_hash(torch.tensor(ids), torch.tensor(coeffs), 1_000_003).tolist()
        assert got == [reference_hash(x, coeffs, 1_000_003) for x in ids]


def test_hash_is_deterministic_across_processes_and_runs():
    tables = [TableSpec("t_C3", rows=10**6, dim=8, features=("C3",))]
    ids = torch.arange(0, 5 * 10**9, 10**7)
    mine = HashedEmbeddings(tables, emb_cfg(hash_seed=7), SGD, CPU).hash(single_hot({"C3": ids}))
    again = HashedEmbeddings(tables, emb_cfg(hash_seed=7), SGD, CPU).hash(single_hot({"C3": ids}))
    assert torch.equal(mine, again)
    other_seed = HashedEmbeddings(tables, emb_cfg(hash_seed=8), SGD, CPU).hash(single_hot({"C3": ids}))
    assert not torch.equal(mine, other_seed)
    code = (
        "import torch; from dlrm.embeddings.hashed import universal_hash, hash_coefficients;"
        "c = torch.tensor(hash_coefficients(7, 't_C3'));"
        "print(universal_hash(torch.arange(0, 5 * 10**9, 10**7), c, 250000).tolist())"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert eval(out.stdout.strip().splitlines()[-1]) == mine.tolist()


def chi_square_p(rows: torch.Tensor, buckets: int) -> float:
    counts = np.bincount(rows.numpy(), minlength=buckets)
    try:
        from scipy.stats import chisquare
    except ImportError:  # Wilson-Hilferty: chi2(k) ~ k (1 - 2/9k + z sqrt(2/9k))^3
        k = buckets - 1
        expected = counts.sum() / buckets
        stat = ((counts - expected) ** 2 / expected).sum()
        z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chisquare(counts).pvalue)


@pytest.mark.parametrize("stride", [1, 1000, 2**32])
def test_hash_spreads_ids_evenly(stride):
    # Consecutive and strided ids: a bare `id % buckets` puts every multiple of 1000 in row 0.
    buckets, ids = 1000, torch.arange(200_000) * stride
    rows = universal_hash(ids, torch.tensor(hash_coefficients(0, "t_C3")), buckets)
    assert chi_square_p(rows, buckets) > 1e-3
    # The check can fail: modulo on the strided ids is rejected (p ~ 0).
    if stride > 1:
        assert chi_square_p(ids % buckets, buckets) < 1e-3


def test_measured_collision_rate_matches_uniform_expectation():
    n, m = 4000, 10_000
    ids = torch.from_numpy(np.random.default_rng(0).choice(10**9, size=n, replace=False))
    tables = [TableSpec("t_C3", rows=10**9, dim=4, features=("C3",))]
    emb = HashedEmbeddings(tables, emb_cfg(dim=4, buckets={"t_C3": m}), SGD, CPU)
    emb(single_hot({"C3": ids}))
    stats = emb.stats()
    expected = 1 - (1 - 1 / m) ** (n - 1)  # 0.33: each other id misses my bucket w.p. 1 - 1/m
    assert stats["collision_rate"] == pytest.approx(expected, abs=0.03)  # sd ~ 0.008
    assert stats["rows_touched"] == pytest.approx(m * (1 - (1 - 1 / m) ** n), rel=0.02)


def test_collision_stats_count_distinct_ids():
    # ids 5 (twice: one id, no collision with itself) and 6 share row 2; 7 and 8 have rows alone.
    ids, rows = torch.tensor([5, 5, 6, 7, 8, 5]), torch.tensor([2, 2, 2, 3, 4, 2])
    assert collision_stats(ids, rows) == (4, 2, 3)


def test_stats_only_over_the_last_batch_and_per_table():
    tables = [TableSpec("t_C1", 100, 4, ("C1",)), TableSpec("t_C2", 100, 4, ("C2",))]
    emb = HashedEmbeddings(tables, emb_cfg(dim=4, buckets={"C1": 1, "C2": 1000}, stats_per_table=True), SGD, CPU)
    assert emb.stats() == {}
    emb(kjt({"C1": [[1, 2], [3]], "C2": [[1], [1, 1]]}))
    s = emb.stats()
    # C1: 3 distinct ids in 1 bucket, all collide; C2: one distinct id.
    assert s["collision_rate"] == 3 / 4 and s["rows_touched"] == 2
    assert s["collision_rate/t_C1"] == 1.0 and s["collision_rate/t_C2"] == 0.0
    emb.eval()  # an eval batch (results.json is written after the final eval) leaves them alone
    emb(kjt({"C1": [[1], [1]], "C2": [[2], [3]]}))
    assert emb.stats() == s


# ----------------------------------------------------------------------------- qr


def qr_reference(emb: QREmbeddings, bags: dict[str, list[list[int]]]) -> torch.Tensor:
    """Two plain tables, id by id, combined then pooled, in Python loops."""
    weights = emb.tbe.split_embedding_weights()
    out = []
    for s in range(len(next(iter(bags.values())))):
        row = []
        for i, f in enumerate(emb.features):
            q_w, r_w, m = weights[2 * i], weights[2 * i + 1], emb.m[i]
            per_id = []
            for x in bags[f][s]:
                q, r = q_w[x // m], r_w[x % m]
                per_id.append({"mult": q * r, "add": q + r, "concat": torch.cat([q, r])}[emb.combiner])
            pooled = torch.stack(per_id).sum(0) if per_id else torch.zeros(emb.dim)
            if emb.pooling == "mean" and per_id:
                pooled = pooled / len(per_id)
            row.append(pooled)
        out.append(torch.cat(row))
    return torch.stack(out)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("combiner", ["mult", "add", "concat"])
def test_qr_equals_two_table_reference(combiner, pooling):
    tables = [TableSpec("t_C1", 1000, 8, ("C1",)), TableSpec("t_C2", 50, 8, ("C2",))]
    emb = QREmbeddings(tables, emb_cfg(combiner=combiner, pooling=pooling, m={"t_C2": 7}), SGD, CPU)
    with torch.no_grad():  # random quotient rows too (they start at 1 or 0 for mult / add)
        for w in emb.tbe.split_embedding_weights():
            w.normal_()
    multi = {"C1": [[1, 999, 500], [], [3]], "C2": [[49], [0, 7, 14, 48], [6, 6]]}
    single = {"C1": [[17], [999], [0]], "C2": [[3], [49], [8]]}
    for bags in (multi, single):
        out = emb(kjt(bags))
        assert out.values().shape == (3, 16)
        torch.testing.assert_close(out.values(), qr_reference(emb, bags), rtol=1e-5, atol=1e-6)


def test_qr_sizes_give_about_rows_over_compression():
    for rows in (20_000, 93_145, 2_202_608, 10_131_227):
        for c in (4, 16, 64):
            m = remainder_size(rows, c)
            total, target = m + math.ceil(rows / m), rows / c
            assert m <= rows and target <= total <= target + 2, (rows, c, m, total)
    # Too small to reach c (rows < 4 c^2): the fewest rows QR can have, about 2 sqrt(rows).
    assert remainder_size(10_000, 64) == 100


def test_qr_starts_as_the_hashing_trick():
    tables = [TableSpec("t_C1", 1000, 8, ("C1",))]
    for combiner in ("mult", "add"):
        emb = QREmbeddings(tables, emb_cfg(combiner=combiner), SGD, CPU)
        remainder = emb.tbe.split_embedding_weights()[1]
        out = emb(kjt({"C1": [[5], [5 + emb.m[0]]]})).values()
        torch.testing.assert_close(out, remainder[[5, 5]])


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("optim,state_per_row", [(SGD, 0), (ADAGRAD, 1)])
def test_embedding_bytes_are_exact(optim, state_per_row):
    tables = [TableSpec("t_C1", 1000, 8, ("C1",)), TableSpec("t_C2", 333, 8, ("C2",))]
    hashed = HashedEmbeddings(tables, emb_cfg(compression=3), optim, CPU)
    assert hashed.buckets == [334, 111]
    assert hashed.embedding_bytes() == (334 + 111) * (8 + state_per_row) * 4
    assert hashed.full_bytes() == (1000 + 333) * 9 * 4
    for combiner, width in (("mult", 8), ("concat", 4)):
        qr = QREmbeddings(tables, emb_cfg(compression=3, combiner=combiner), optim, CPU)
        rows = sum(qr.m) + sum(qr.quotient_rows)
        assert qr.embedding_bytes() == rows * (width + state_per_row) * 4
        # Same compression, about the same float count as hashed (a few rows of rounding).
        assert abs(rows * width - (334 + 111) * 8) <= 4 * 8


def test_registry_keeps_small_tables_full_and_sums_bytes():
    tables = [TableSpec("t_C1", 50_000, 8, ("C1",)), TableSpec("t_C2", 100, 8, ("C2",))]
    emb = build_embeddings(tables, emb_cfg(name="hashed", min_rows=10_000, compression=16), SGD, CPU)
    assert isinstance(emb, SplitEmbeddings)
    hashed, full = emb.parts
    assert isinstance(hashed, HashedEmbeddings) and isinstance(full, FullEmbeddings)
    assert emb.embedding_bytes() == (3125 + 100) * 8 * 4
    out = emb(kjt({"C1": [[1], [49_999]], "C2": [[3], [99]]}))
    assert out.values().shape == (2, 16) and set(emb.stats()) == {"collision_rate", "rows_touched"}
    qr = build_embeddings(tables, emb_cfg(name="qr", min_rows=10_000), SGD, CPU)
    assert isinstance(qr.parts[0], QREmbeddings)


# ----------------------------------------------------------------------------- training updates


def changed_rows(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[set[int]]:
    return [set((a != b).any(1).nonzero().flatten().tolist()) for a, b in zip(after, before)]


def test_fused_sgd_updates_exactly_the_hashed_rows():
    tables = [TableSpec("t_C1", 10**6, 4, ("C1",))]
    emb = HashedEmbeddings(tables, emb_cfg(dim=4, buckets={"t_C1": 50}), SGD, CPU)
    batch = kjt({"C1": [[1, 2], [3], [10**9]]})  # 10**9: beyond the table, hashed like any id
    rows = emb.hash(batch)
    before = [w.clone() for w in emb.tbe.split_embedding_weights()]
    emb(batch).values().sum().backward()
    after = emb.tbe.split_embedding_weights()
    assert changed_rows(before, after) == [set(rows.tolist())]
    # d(sum)/d(row) = number of lookups of that row; SGD lr 0.5.
    hits = torch.bincount(rows, minlength=50).float()
    torch.testing.assert_close(after[0] - before[0], -0.5 * hits[:, None].expand(-1, 4))


@pytest.mark.parametrize("bags", [[[1, 31, 999], [45]], [[1], [31], [999], [45]]])
@pytest.mark.parametrize("combiner", ["mult", "add", "concat"])
def test_fused_sgd_updates_exactly_the_qr_rows(combiner, bags):
    tables = [TableSpec("t_C1", 1000, 8, ("C1",))]
    emb = QREmbeddings(tables, emb_cfg(combiner=combiner, m={"t_C1": 30}), SGD, CPU)
    ids = [1, 31, 999, 45]
    before = [w.clone() for w in emb.tbe.split_embedding_weights()]
    (emb(kjt({"C1": bags})).values() * torch.randn(len(bags), 8)).sum().backward()
    assert changed_rows(before, emb.tbe.split_embedding_weights()) == [
        {x // 30 for x in ids},
        {x % 30 for x in ids},
    ]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cls,kw,message",
    [
        (HashedEmbeddings, {"compression": 0.5}, "emb.compression=0.5"),
        (HashedEmbeddings, {"compression": "lots"}, "emb.compression='lots'"),
        (HashedEmbeddings, {"buckets": {"t_C1": 0}}, "emb.buckets.t_C1=0"),
        (HashedEmbeddings, {"buckets": {"C1": 2.5}}, "emb.buckets.C1=2.5"),
        (HashedEmbeddings, {"hash_seed": -1}, "emb.hash_seed=-1"),
        (QREmbeddings, {"compression": 0}, "emb.compression=0"),
        (QREmbeddings, {"m": {"C1": 1001}}, "emb.m.t_C1=1001"),
        (QREmbeddings, {"combiner": "max"}, "emb.combiner='max'"),
        (QREmbeddings, {"combiner": "concat", "dim": 7}, "emb.dim=7"),
    ],
)
def test_bad_config_fails_in_the_constructor(cls, kw, message):
    dim = kw.get("dim", 8)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")) as e:
        cls([TableSpec("t_C1", 1000, dim, ("C1",))], emb_cfg(**kw), SGD, CPU)
    assert "\n" not in str(e.value)


def test_out_of_range_ids_are_hashed_by_hashed_and_rejected_by_full_and_qr():
    tables = [TableSpec("t_C1", 100, 4, ("C1",)), TableSpec("t_C2", 100, 4, ("C2",))]
    batch = kjt({"C1": [[5]], "C2": [[100]]})
    assert HashedEmbeddings(tables, emb_cfg(dim=4), SGD, CPU)(batch).values().shape == (1, 8)
    for cls in (FullEmbeddings, QREmbeddings):
        with pytest.raises(ValueError, match=r"feature C2: ids must be in \[0, 100\)"):
            cls(tables, emb_cfg(dim=4), SGD, CPU)(batch)


def test_pair_product_gradient_matches_autograd():
    from dlrm.embeddings.qr import PairProduct

    x = torch.randn(3, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PairProduct.apply, (x,))


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("backend", ["hashed", "qr"])
def test_trains_to_auc_clearly_above_chance(compose_cfg, tiny_dataset, tmp_path, backend):
    import json

    from dlrm.train import run

    cfg = compose_cfg(
        f"emb={backend}",
        "compression=4",
        "emb.min_rows=1000",  # the tiny tables have <= 2000 rows: compress the large ones
        # SGD at lr 0.05 barely moves the tables in 110 steps; row-wise Adagrad does.
        "optim.sparse.name=rowwise_adagrad",
        "optim.sparse.lr=0.1",
        "trainer.max_steps=110",
        "seed=1",
    )
    assert cfg.emb.compression == 4 and cfg.emb.name == backend  # the top-level knob reaches emb
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == backend
    assert results["auc"] > 0.62  # full tables reach ~0.72 in these steps; chance is 0.5
    assert 0 < results["collision_rate"] < 1 and results["rows_touched"] > 0
    assert 3 < results["compression_ratio"] < 4  # 4x on the compressed tables, small ones full


def test_shared_tables_hash_alike_in_hashed_and_are_refused_by_qr():
    tables = [TableSpec("t_C1", 1000, 4, ("C1", "C2"))]
    emb = HashedEmbeddings(tables, emb_cfg(dim=4), SGD, CPU)
    out = emb(kjt({"C1": [[7]], "C2": [[7]]})).values()
    torch.testing.assert_close(out[:, :4], out[:, 4:])  # one table, one hash: same row
    with pytest.raises(ValueError, match=r"emb=qr: tables \['t_C1'\] are shared"):
        QREmbeddings(tables, emb_cfg(dim=4), SGD, CPU)

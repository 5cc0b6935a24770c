"""emb=hybrid: exact hot rows by counts, hashed cold rows, bytes, fused updates; per-id counts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.counts import ensure_counts, table_counts
from dlrm.data.schema import SPARSE, DatasetMeta
from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.hashed import PRIME, hash_coefficients
from dlrm.embeddings.hybrid import hybrid_sizes
from dlrm.embeddings.tables import tbe_bytes
from dlrm.train import run

CPU = torch.device("cpu")
SGD = OmegaConf.create({"name": "sgd", "lr": 0.5})
TABLES = [TableSpec("t_C1", 1000, 4, ("C1",)), TableSpec("t_C2", 300, 4, ("C2",))]


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
        np.save(tmp_path / f"{t.features[0]}.npy", rng.integers(0, 50, t.rows))  # many ties
    return tmp_path


def reference_row(table: TableSpec, counts: np.ndarray, hot: int, buckets: int, x: int) -> int:
    """Python: hot ids are the `hot` largest counts (ties: lower id), numbered by id; others hashed."""
    ranked = sorted(range(table.rows), key=lambda i: (-counts[i], i))[:hot]
    hot_sorted = sorted(ranked)
    if x in hot_sorted:
        return hot_sorted.index(x)
    a0, a1, a2, b = hash_coefficients(0, table.name)
    return hot + (a0 * x + b) % PRIME % buckets  # ids < 2^30: one limb


def build(counts_dir=None, **kw):
    cfg = OmegaConf.create({"name": "hybrid", "dim": 4, "compression": 4, "min_rows": 0, "counts": counts_dir, **kw})
    return build_embeddings(TABLES, cfg, SGD, CPU)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_forward_and_fused_update_equal_hand_built_reference(counts_dir, pooling):
    emb = build(str(counts_dir), pooling=pooling)
    assert (emb.hot, emb.buckets) == ([125, 37], [125, 38])
    # 6 ids of C1, 7 of C2: per-id hash parameters (unequal lengths; equal ones broadcast)
    bags = {"C1": [[0, 7, 999], [7], [500, 3]], "C2": [[299], [1, 2], [5, 5, 6, 7]]}
    counts = {t.name: np.load(counts_dir / f"{t.features[0]}.npy") for t in TABLES}
    weights = [w.clone() for w in emb.tbe.split_embedding_weights()]
    out = emb(kjt(bags))
    grad = torch.randn_like(out.values())
    out.values().backward(grad)
    for i, (t, f) in enumerate(zip(TABLES, ("C1", "C2"))):
        expected_w = weights[i].clone()
        for b, bag in enumerate(bags[f]):
            rows = [reference_row(t, counts[t.name], emb.hot[i], emb.buckets[i], x) for x in bag]
            scale = 1.0 / len(bag) if pooling == "mean" else 1.0
            torch.testing.assert_close(out[f][b], weights[i][rows].sum(0) * scale)
            for r in rows:
                expected_w[r] -= 0.5 * scale * grad[b, 4 * i : 4 * i + 4]
        torch.testing.assert_close(emb.tbe.split_embedding_weights()[i], expected_w)


def test_hot_ids_keep_their_own_rows_and_bytes_are_exact(counts_dir):
    emb = build(str(counts_dir))
    counts = table_counts(counts_dir, TABLES[0])
    hot = np.argsort(-counts, kind="stable")[: emb.hot[0]]
    rows, _ = emb.remap(kjt({"C1": [[int(x)] for x in hot], "C2": [[0]] * len(hot)}))
    assert sorted(rows[: len(hot)].tolist()) == list(range(emb.hot[0]))  # distinct, exact
    assert emb.embedding_bytes() == tbe_bytes(emb.tbe) + 8 * sum(emb.hot)
    assert emb.embedding_bytes() == sum(h + b for h, b in zip(emb.hot, emb.buckets)) * 4 * 4 + 8 * sum(emb.hot)


def test_without_counts_ids_are_taken_as_frequency_ordered(caplog):
    emb = build()
    assert "taking ids as frequency-ordered" in caplog.text
    rows, _ = emb.remap(kjt({"C1": [[0], [124], [125]], "C2": [[0], [36], [37]]}))
    assert rows[:2].tolist() == [0, 124] and rows[2] >= 125 and rows[3:5].tolist() == [0, 36]


def test_sizes_and_overrides(counts_dir):
    assert hybrid_sizes(1_000_000, 62500, 0.5) == (31250, 31250)
    assert hybrid_sizes(10, 10, 1.0) == (9, 1)  # one bucket is always kept for any other id
    emb = build(str(counts_dir), hot_rows={"C1": 10}, buckets={"C1": 3}, hot_share=0.0)
    assert (emb.hot, emb.buckets) == ([10, 0], [3, 75])
    with pytest.raises(ValueError, match="emb.hot_share=2"):
        build(str(counts_dir), hot_share=2)
    with pytest.raises(ValueError, match="feature C1: ids must be in"):
        build(str(counts_dir))(kjt({"C1": [[1000]], "C2": [[0]]}))


def test_counts_computed_once_from_the_train_split(tiny_dataset):
    meta = DatasetMeta.load(tiny_dataset)
    out = ensure_counts(tiny_dataset)
    assert out == tiny_dataset / "counts" and ensure_counts(tiny_dataset) == out
    for f in ("C1", "C14"):
        ids = np.concatenate([pq.read_table(tiny_dataset / rel, columns=[f])[f].to_numpy() for rel in meta.splits["train"]])
        expected = np.bincount(ids, minlength=meta.cardinalities[f])
        assert np.array_equal(np.load(out / f"{f}.npy"), expected)
    assert sorted(p.stem for p in out.glob("*.npy")) == sorted(SPARSE)
    # folded like the loader folds ids (data.max_rows): id % rows
    c = np.load(out / "C1.npy")
    folded = table_counts(out, TableSpec("t_C1", 7, 4, ("C1",)))
    assert np.array_equal(folded, np.bincount(np.arange(len(c)) % 7, weights=c).astype(np.int64))


def test_hybrid_trains_from_the_dataset_counts(compose_cfg, tiny_dataset, tmp_path):
    results = run(compose_cfg("emb=hybrid", "emb.min_rows=500", "compression=8", "trainer.max_steps=60"), tmp_path)
    assert results["auc"] > 0.6 and 0 < results["hot_hit_rate"] < 1
    assert results["compression_ratio"] > 1.5


def test_counts_of_multi_hot_features_count_every_id(tmp_path):
    from dlrm.data.synthetic import SyntheticSpec, ensure_dataset

    path = ensure_dataset(
        SyntheticSpec(rows=3000, eval_rows=500, max_cardinality=300, row_group_rows=1000, multi_hot={"C1": 3}), tmp_path
    )
    counts = np.load(ensure_counts(path) / "C1.npy")
    column = pq.read_table(path / "train", columns=["C1"])["C1"].combine_chunks()
    assert counts.sum() == len(column.flatten()) > 3000  # 1..3 ids per row, each one counted
    assert np.array_equal(counts, np.bincount(column.flatten().to_numpy(), minlength=len(counts)))

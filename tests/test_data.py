"""Synthetic generator and parquet loader: schema, determinism, click rate, batches, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm.data.loader import ParquetLoader
from dlrm.data.schema import DENSE, LABEL, SPARSE, DatasetMeta
from dlrm.data.synthetic import SyntheticSpec, ensure_dataset, zipf_ids

from conftest import TINY


def read_split(path, split):
    meta = DatasetMeta.load(path)
    return pq.read_table([path / f for f in meta.splits[split]]).to_pandas()


def test_generator_schema_and_meta(tiny_dataset):
    meta = DatasetMeta.load(tiny_dataset)
    assert meta.rows == {"train": TINY["rows"], "eval": TINY["eval_rows"]}
    assert list(meta.cardinalities) == SPARSE
    assert max(meta.cardinalities.values()) == TINY["max_cardinality"]
    df = read_split(tiny_dataset, "train")
    assert list(df.columns) == [LABEL, *DENSE, *SPARSE]
    assert len(df) == TINY["rows"]
    assert set(df[LABEL].unique()) == {0, 1}
    for name in SPARSE:
        assert df[name].min() >= 0 and df[name].max() < meta.cardinalities[name], name
    # Criteo quirks the loader must handle: missing counts and negative counts.
    assert df["I1"].isna().mean() > 0.3
    assert (df["I2"] < 0).any()
    # ids are frequency-ordered: id 0 is the most common value of a large feature
    assert df["C3"].value_counts().idxmax() == 0


def test_click_rate_and_teacher_ceiling(tiny_dataset):
    meta = DatasetMeta.load(tiny_dataset)
    df = read_split(tiny_dataset, "eval")
    assert 0.22 < df[LABEL].mean() < 0.28
    assert 0.7 < meta.extra["teacher_auc"] < 0.95


def test_generation_is_deterministic_and_reused(tmp_path, tiny_dataset):
    again = ensure_dataset(SyntheticSpec(**TINY), tmp_path)
    assert again.name == tiny_dataset.name  # same settings -> same fingerprint
    a, b = read_split(tiny_dataset, "train"), read_split(again, "train")
    assert a.equals(b)
    mtime = (again / "meta.json").stat().st_mtime
    assert ensure_dataset(SyntheticSpec(**TINY), tmp_path) == again  # reused, not regenerated
    assert (again / "meta.json").stat().st_mtime == mtime
    other = ensure_dataset(SyntheticSpec(**{**TINY, "seed": 1, "rows": 5000}), tmp_path)
    assert other != again


def test_zipf_ids_are_skewed_and_in_range():
    ids = zipf_ids(np.random.default_rng(0), 1000, 100_000, 1.05)
    assert ids.min() >= 0 and ids.max() < 1000
    counts = np.bincount(ids, minlength=1000)
    assert counts[0] > counts[10] > counts[500]


def test_bad_generator_settings():
    with pytest.raises(ValueError, match="data.rows"):
        SyntheticSpec(rows=0).validate()
    with pytest.raises(ValueError, match="data.multi_hot"):
        SyntheticSpec(multi_hot={"C99": 3}).validate()
    with pytest.raises(ValueError, match="data.table_rows.C3=0"):
        SyntheticSpec(table_rows={"C3": 0}).validate()


def test_table_rows_resizes_one_table(tmp_path):
    spec = SyntheticSpec(rows=3000, eval_rows=1000, max_cardinality=500, table_rows={"C3": 5_000_000})
    path = ensure_dataset(spec, tmp_path)
    cards = DatasetMeta.load(path).cardinalities
    assert cards["C3"] == 5_000_000 and cards["C4"] == 500  # the cap still holds for the others
    c3 = read_split(path, "train")["C3"].to_numpy()
    assert c3.max() >= 500 and c3.max() < 5_000_000
    assert SyntheticSpec().fingerprint() != SyntheticSpec(table_rows={"C3": 10}).fingerprint()


def test_loader_epoch_is_exact_and_kjt_matches_parquet(tiny_dataset):
    loader = ParquetLoader(tiny_dataset, "eval", batch_size=1000, shuffle=False)
    df = read_split(tiny_dataset, "eval")
    batches = list(loader.epoch(0))
    assert [len(b) for b in batches] == [1000] * 8  # 8000 rows
    first = batches[0]
    assert first.sparse.keys() == SPARSE
    assert first.dense.shape == (1000, 13) and first.dense.dtype == torch.float32
    per_key = first.sparse.to_dict()
    for name in ("C1", "C3", "C26"):
        assert per_key[name].values().tolist() == df[name][:1000].tolist()
        assert per_key[name].lengths().tolist() == [1] * 1000
    expected = np.log1p(np.maximum(df[DENSE][:1000].fillna(0).to_numpy(np.float32), 0))
    np.testing.assert_allclose(first.dense.numpy(), expected, rtol=1e-6)
    assert first.labels.tolist() == df[LABEL][:1000].astype(float).tolist()


def test_shuffled_epoch_has_every_row_once_and_depends_on_seed(tiny_dataset):
    def epoch(seed, e):
        loader = ParquetLoader(tiny_dataset, "train", batch_size=999, seed=seed)
        return list(loader.epoch(e))

    a = epoch(1, 0)
    df = read_split(tiny_dataset, "train")
    assert sum(len(b) for b in a) == len(df)
    assert len(a[-1]) == len(df) % 999  # the short last batch is kept, nothing dropped
    got = np.sort(np.concatenate([b.sparse.to_dict()["C3"].values().numpy() for b in a]))
    assert (got == np.sort(df["C3"].to_numpy())).all()
    assert float(sum(b.labels.sum() for b in a)) == df[LABEL].sum()
    again, other_epoch, other_seed = epoch(1, 0), epoch(1, 1), epoch(2, 0)
    assert torch.equal(a[0].labels, again[0].labels) and torch.equal(a[0].dense, again[0].dense)
    assert not torch.equal(a[0].dense, other_epoch[0].dense)
    assert not torch.equal(a[0].dense, other_seed[0].dense)


def test_started_epoch_yields_the_same_batches_and_stops_cleanly(tiny_dataset):
    """`start` (train.py calls it before building the model) reads ahead in the background; the
    epoch then yields exactly what it would have, a start for another epoch is dropped, and
    `stop` ends an epoch nobody took over."""
    def dense(batches):
        return [b.dense for b in batches]

    plain = ParquetLoader(tiny_dataset, "train", batch_size=999, seed=1)
    want0, want1 = dense(plain.epoch(0)), dense(plain.epoch(1))
    loader = ParquetLoader(tiny_dataset, "train", batch_size=999, seed=1)
    loader.start(0)
    assert loader._started is not None and loader._started[-1].is_alive()
    got = dense(loader.epoch(0))
    assert len(got) == len(want0) and all(torch.equal(a, b) for a, b in zip(got, want0))
    loader.start(0)  # a start for epoch 0, then epoch 1 is asked for: that thread is stopped
    thread = loader._started[-1]
    got = dense(loader.epoch(1))
    assert not thread.is_alive()
    assert all(torch.equal(a, b) for a, b in zip(got, want1)) and len(got) == len(want1)
    loader.start(0)
    thread = loader._started[-1]
    loader.stop()
    assert loader._started is None and not thread.is_alive()


def test_worker_processes_give_every_row_once_deterministically(tiny_dataset):
    def epoch(workers):
        loader = ParquetLoader(
            tiny_dataset, "train", batch_size=1000, seed=4, workers=workers, buffer_row_groups=1
        )
        return list(loader.epoch(0))

    one, two, again = epoch(0), epoch(2), epoch(2)
    df = read_split(tiny_dataset, "train")

    def c3(batches):
        return np.concatenate([b.sparse.to_dict()["C3"].values().numpy() for b in batches])

    assert sum(len(b) for b in two) == len(df)  # each worker ends with its own short batch
    assert (np.sort(c3(two)) == np.sort(df["C3"].to_numpy())).all()
    assert (np.sort(c3(two)) == np.sort(c3(one))).all()
    assert all(torch.equal(a.dense, b.dense) for a, b in zip(two, again))
    with pytest.raises(ValueError, match="data.workers=-1"):
        ParquetLoader(tiny_dataset, "train", 8, workers=-1)


def test_loader_caps_large_tables(tiny_dataset):
    loader = ParquetLoader(tiny_dataset, "eval", batch_size=4000, shuffle=False, max_rows=100)
    assert loader.cardinalities["C3"] == 100 and loader.cardinalities["C9"] == 3
    batch = next(iter(loader.epoch(0)))
    assert batch.sparse.to_dict()["C3"].values().max() < 100


def test_multi_hot_features_become_jagged(tmp_path):
    spec = SyntheticSpec(rows=3000, eval_rows=1000, max_cardinality=500, multi_hot={"C1": 3})
    path = ensure_dataset(spec, tmp_path)
    df = read_split(path, "eval")
    loader = ParquetLoader(path, "eval", batch_size=100, shuffle=False)
    batch = next(iter(loader.epoch(0)))
    c1 = batch.sparse.to_dict()["C1"]
    assert c1.lengths().tolist() == [len(x) for x in df["C1"][:100]]
    assert set(c1.lengths().tolist()) == {1, 2, 3}
    assert c1.values().tolist() == [int(v) for row in df["C1"][:100] for v in row]
    assert batch.sparse.to_dict()["C2"].lengths().tolist() == [1] * 100


def test_loader_bad_input(tmp_path, tiny_dataset):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ParquetLoader(tmp_path / "nope", "train", 8)
    with pytest.raises(ValueError, match="no split 'test'"):
        ParquetLoader(tiny_dataset, "test", 8)
    # parquet without the expected columns
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    part = broken / DatasetMeta.load(broken).splits["eval"][0]
    pq.write_table(pq.read_table(part).drop(["C7", "I3"]), part)
    with pytest.raises(ValueError, match=r"missing columns \['I3', 'C7'\]"):
        ParquetLoader(broken, "eval", 8)
    # a missing label or id is an error naming the file, not a silent 0
    table = pq.read_table(tiny_dataset / DatasetMeta.load(tiny_dataset).splits["eval"][0])
    labels = pa.array([None] + table.column("label").to_pylist()[1:], pa.int8())
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", labels), part)
    with pytest.raises(ValueError, match=r"part-.*: row group 0: missing values in \['label'\]"):
        list(ParquetLoader(broken, "eval", 8).epoch(0))
    # a truncated parquet file
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable parquet file"):
        ParquetLoader(broken, "eval", 8)


def test_loader_thread_runs_torch_on_one_openmp_thread(tiny_dataset, monkeypatch):
    """The loader thread's torch ops must not start a second OpenMP team (it throttles the
    training step's team: dlrm.threads), and limiting that thread leaves the main thread alone."""
    import threading

    import dlrm.data.loader as loader_mod
    from dlrm.threads import limit_this_thread

    seen = {}

    def recording_limit(threads: int = 1) -> bool:
        ok = limit_this_thread(threads)
        seen[threading.current_thread().name] = torch.get_num_threads()
        return ok

    monkeypatch.setattr(loader_mod, "limit_this_thread", recording_limit)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = list(ParquetLoader(tiny_dataset, "train", 256, seed=1).epoch(0))
        assert batches
        assert seen == {"parquet-loader": 1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_loader_thread_decodes_at_a_lower_priority_than_the_step(tiny_dataset, monkeypatch, caplog):
    """The loader's thread runs at nice DLRM_LOADER_NICE (default 10), the caller's stays at 0;
    0 leaves it alone, and a value that is not an integer warns once and changes nothing."""
    import os
    import threading

    import dlrm.data.loader as loader_mod
    from dlrm.threads import lower_this_thread_priority

    seen = {}

    def recording() -> int:
        got = lower_this_thread_priority()
        seen[threading.current_thread().name] = (got, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return got

    monkeypatch.setattr(loader_mod, "lower_this_thread_priority", recording)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert list(ParquetLoader(tiny_dataset, "train", 256, seed=1).epoch(0))
    assert seen == {"parquet-loader": (max(base, 10), max(base, 10))}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's: unchanged
    for value, want in (("0", 0), ("seven", 0)):
        monkeypatch.setenv("DLRM_LOADER_NICE", value)
        out = []
        worker = threading.Thread(target=lambda: out.append(lower_this_thread_priority()))
        worker.start()
        worker.join()
        assert out == [want]
    assert "DLRM_LOADER_NICE='seven' is not an integer" in caplog.text

"""Criteo text -> parquet preprocessing: values, ids, counts, splits, bad input, resume."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlrm.data import criteo_text as ct
from dlrm.data import preprocess as pp
from dlrm.data.preprocess import chunks as pp_chunks
from dlrm.data.preprocess import encode as pp_encode
from dlrm.data.schema import DENSE, LABEL, SPARSE, DatasetMeta

FIXTURES = Path(__file__).parent / "fixtures"


def rows(n: int, seed: int = 0, vocab: int = 50):
    """Random Criteo-shaped arrays; I1 = row number, so every output row can be traced back."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    dense = rng.integers(-3, 100, (n, 13)).astype(np.float64)
    dense[rng.random((n, 13)) < 0.2] = np.nan
    dense[:, 0] = np.arange(n)
    sparse = rng.zipf(1.5, (n, 26)) % vocab + rng.integers(0, 3, 26) * 1_000_000  # skewed
    sparse[rng.random((n, 26)) < 0.1] = -1  # missing
    return label, dense, sparse


def run(inputs, out, **kw):
    kw.setdefault("progress", False)
    return pp.preprocess([str(p) for p in inputs], out, **kw)


def read_split(out: Path, split: str) -> pa.Table:
    meta = DatasetMeta.load(out)
    return pa.concat_tables([pq.read_table(out / f) for f in meta.splits[split]])


def read_all(out: Path) -> pa.Table:
    """All rows in file order (splits are consecutive: train, test, val)."""
    meta = DatasetMeta.load(out)
    t = pa.concat_tables([read_split(out, s) for s in meta.splits])
    return t.sort_by("I1")


def hex8(v: int) -> str:
    return "%08x" % v


# ---------------------------------------------------------------------------------------------
# Writing text


def test_write_criteo_text_renders_the_real_formats(tmp_path):
    label = np.array([1, 0])
    dense = np.full((2, 13), np.nan)
    dense[0, :3] = [5, -1, 0]
    sparse = np.full((2, 26), -1)
    sparse[0, 0], sparse[1, 25] = 0x2A, 0xDEADBEEF
    ct.write_criteo_text(tmp_path / "a.txt", label, dense, sparse)
    first, second = (tmp_path / "a.txt").read_text().splitlines()
    fields = first.split("\t")
    assert len(fields) == 40 and fields[:4] == ["1", "5", "-1", "0"] and fields[4] == ""
    assert fields[14] == "0000002a" and fields[15] == ""
    assert second.split("\t")[39] == "deadbeef"
    ct.write_criteo_text(tmp_path / "a.csv.gz", label, dense, sparse, fmt="csv")
    text = gzip.decompress((tmp_path / "a.csv.gz").read_bytes()).decode().splitlines()
    assert text[0].startswith("Id,Label,I1,") and text[1].startswith("10000000,1,5,-1,0,")
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Round trip, ids, counts


@pytest.mark.parametrize("lookup,staging", [("hash index", True), ("binary search", True), ("hash index", False)])
def test_round_trip_values_ids_and_counts(tmp_path, monkeypatch, lookup, staging):
    if lookup == "binary search":  # the path real (multi-million) vocabularies take
        monkeypatch.setattr(pp_encode, "SMALL_VOCAB", 0)
    n = 3000
    label, dense, sparse = rows(n)
    ct.write_criteo_text(tmp_path / "train.txt", label, dense, sparse)
    summary = run([tmp_path / "train.txt"], tmp_path / "out", split="none", chunk_bytes=100_000, staging=staging)
    out = tmp_path / "out"
    t = read_all(out)
    meta = DatasetMeta.load(out)
    assert summary["rows_in"] == n and meta.rows == {"train": n} and t.num_rows == n
    assert t.schema.field(LABEL).type == pa.int8() and t.schema.field("C1").type == pa.int64()
    np.testing.assert_array_equal(t[LABEL].to_numpy(), label)
    for j, c in enumerate(DENSE):
        col = t[c].to_numpy(zero_copy_only=False)  # nulls -> NaN
        np.testing.assert_array_equal(col, dense[:, j])  # NaN == NaN here, negatives kept
    for j, c in enumerate(SPARSE):
        ids = t[c].to_numpy()
        vals = sparse[:, j]
        assert (ids[vals < 0] == 0).all() and (ids[vals >= 0] > 0).all()
        pairs = set(zip(vals[vals >= 0].tolist(), ids[vals >= 0].tolist()))
        assert len({v for v, _ in pairs}) == len(pairs) == len({i for _, i in pairs})  # 1-to-1
        counts = np.load(out / "counts" / f"{c}.npy")
        assert len(counts) == meta.cardinalities[c] == len(pairs) + 1 and ids.max() < len(counts)
        np.testing.assert_array_equal(counts, np.bincount(ids, minlength=len(counts)))
        assert (np.diff(counts[1:]) <= 0).all()  # frequency order: id 1 the most frequent
        top = Counter(vals[vals >= 0].tolist()).most_common(1)[0][1]
        assert counts[1] == top


def test_fixture_ids_follow_frequency_and_csv_matches_tsv(tmp_path):
    run([FIXTURES / "kaggle_small.txt"], tmp_path / "tsv", split="none")
    run([FIXTURES / "kaggle_small.csv"], tmp_path / "csv", split="none")
    a, b = read_all(tmp_path / "tsv"), read_all(tmp_path / "csv")
    assert a.num_rows == 28 and a.equals(b)
    c1_text = [line.split("\t")[14] for line in (FIXTURES / "kaggle_small.txt").read_text().splitlines()]
    want = {"75ac2fe6": 1, "05db9164": 2, "68fd1e64": 3, "be589b51": 4, "": 0}
    ids = pq.read_table(tmp_path / "tsv" / "parts" / "kaggle_small-000000.parquet")["C1"].to_pylist()
    assert ids == [want[v] for v in c1_text]
    assert np.load(tmp_path / "tsv" / "counts" / "C1.npy").tolist() == [1, 12, 9, 5, 1]
    assert -1 in a["I2"].to_pylist()  # negative integer features are kept


def test_min_count_and_max_rows_send_rare_values_to_id_0(tmp_path):
    run([FIXTURES / "kaggle_small.txt"], tmp_path / "m", split="none", min_count=6)
    assert np.load(tmp_path / "m" / "counts" / "C1.npy").tolist() == [7, 12, 9]  # 5+1+1 -> id 0
    assert DatasetMeta.load(tmp_path / "m").cardinalities["C1"] == 3
    ids = read_all(tmp_path / "m")["C1"].to_numpy()
    assert sorted(Counter(ids.tolist()).items()) == [(0, 7), (1, 12), (2, 9)]
    run([FIXTURES / "kaggle_small.txt"], tmp_path / "cap", split="none", max_rows=2)
    assert np.load(tmp_path / "cap" / "counts" / "C1.npy").tolist() == [16, 12]
    assert DatasetMeta.load(tmp_path / "cap").cardinalities == {c: 2 for c in SPARSE}


def _splitmix64(x: int) -> int:  # written independently of preprocess.keys.mix64 (pure Python)
    m = (1 << 64) - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_hash_mode_is_one_pass_and_matches_the_formula(tmp_path):
    label, dense, sparse = rows(500, seed=1)
    ct.write_criteo_text(tmp_path / "t.txt", label, dense, sparse)
    summary = run([tmp_path / "t.txt"], tmp_path / "h", mode="hash", max_rows=97, split="none", keep_work=True)
    assert "count" not in summary["seconds"] and not (tmp_path / "h" / ".work" / "count").exists()
    meta = DatasetMeta.load(tmp_path / "h")
    assert meta.cardinalities == {c: 97 for c in SPARSE} and meta.extra["vocab_dir"] is None
    t = read_all(tmp_path / "h")
    for j in (0, 7, 25):
        c, vals, ids = SPARSE[j], sparse[:, j], t[SPARSE[j]].to_numpy()
        want = [0 if v < 0 else 1 + _splitmix64(int.from_bytes(hex8(v).encode(), "big")) % 96 for v in vals]
        assert ids.tolist() == want
        np.testing.assert_array_equal(np.load(tmp_path / "h" / "counts" / f"{c}.npy"), np.bincount(ids, minlength=97))
    with pytest.raises(pp.PreprocessError, match="max-rows"):
        run([tmp_path / "t.txt"], tmp_path / "h2", mode="hash")


# ---------------------------------------------------------------------------------------------
# Splits


def test_kaggle_split_is_the_reference_seven_parts(tmp_path):
    n = 1003  # 1003 = 7 * 143 + 2: the first two parts get one extra row
    label, dense, sparse = rows(n, seed=2)
    ct.write_criteo_text(tmp_path / "train.txt", label, dense, sparse)
    run([tmp_path / "train.txt"], tmp_path / "k", chunk_bytes=40_000)  # chunks straddle boundaries
    meta = DatasetMeta.load(tmp_path / "k")
    parts = np.array_split(np.arange(n), 7)  # the reference split
    test, val = np.array_split(parts[6], 2)
    want = {"train": np.concatenate(parts[:6]), "test": test, "val": val}
    assert meta.rows == {k: len(v) for k, v in want.items()} == {"train": 860, "test": 72, "val": 71}
    for split, idx in want.items():
        got = read_split(tmp_path / "k", split)["I1"].to_numpy()  # I1 = input row number, in order
        np.testing.assert_array_equal(got, idx)
    assert any(".test." in f for f in meta.splits["test"])  # a sliced boundary chunk
    assert not [p for p in (tmp_path / "k" / "parts").iterdir() if str(p.relative_to(tmp_path / "k")) not in sum(meta.splits.values(), [])]


def test_cli_runs_with_dataset_names(tmp_path, capsys):
    out = tmp_path / "k"
    assert pp.main([str(FIXTURES / "kaggle_small.txt"), "--out", str(out), "--dataset", "kaggle", "--quiet", "--workers", "1"]) == 0
    assert DatasetMeta.load(out).rows == {"train": 24, "test": 2, "val": 2}  # 7 parts of 4 rows
    assert pp.main([str(FIXTURES / "kaggle_small.txt"), "--out", str(tmp_path / "x"), "--dataset", "kaggle", "--split", "days"]) == 2
    assert "--dataset kaggle" in capsys.readouterr().err


def test_days_split_holds_out_the_last_day_and_obeys_day_options(tmp_path):
    for d, n in [(0, 30), (1, 20), (10, 11), (2, 40)]:  # day_10 must sort after day_2
        label, dense, sparse = rows(n, seed=d)
        dense[:, 0] = d * 1000 + np.arange(n)
        ct.write_criteo_text(tmp_path / f"day_{d}.gz", label, dense, sparse)
    files = sorted(tmp_path.glob("day_*.gz"))
    run(files, tmp_path / "a")
    meta = DatasetMeta.load(tmp_path / "a")
    assert meta.rows == {"train": 90, "test": 6, "val": 5}
    assert read_split(tmp_path / "a", "test")["I1"].to_pylist() == list(range(10000, 10006))
    run(files, tmp_path / "b", val_days=[2], test_days=[10])
    meta = DatasetMeta.load(tmp_path / "b")
    assert meta.rows == {"train": 50, "test": 11, "val": 40}
    with pytest.raises(pp.PreprocessError, match="in no split"):
        run(files, tmp_path / "c", train_days=[0], val_days=[1], test_days=[2])


# ---------------------------------------------------------------------------------------------
# Bad input


BAD_SKIPPED = {"bad label": 3, "bad integer": 3, "too many fields": 1, "empty line": 1}
BAD_LINES = {"bad label": [4, 5, 12], "bad integer": [6, 11, 14], "too many fields": [7], "empty line": [9]}


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 300])  # one chunk; many chunks (global line numbers)
def test_bad_rows_are_counted_reported_and_the_rest_kept(tmp_path, chunk_bytes):
    s = run([FIXTURES / "bad_rows.txt"], tmp_path / "o", split="none", chunk_bytes=chunk_bytes, max_bad_fraction=1)
    assert s["rows_in"] == 15 and s["rows_written"] == {"train": 7} and s["rows_padded"] == 2
    assert s["rows_skipped"] == BAD_SKIPPED
    assert s["first_bad_lines"] == {k: [f"bad_rows.txt:{n}" for n in v] for k, v in BAD_LINES.items()}
    assert s["rows_in"] == sum(s["rows_written"].values()) + sum(s["rows_skipped"].values())
    t = read_split(tmp_path / "o", "train")  # file order: lines 1 2 3 8 10 13 15
    assert t[LABEL].to_pylist() == [0, 1, 1, 1, 0, 1, 1]
    assert t["I1"].to_pylist()[:3] == [1, -1, 3] and t["I4"].to_pylist()[:3] == [4, 4, -2]
    padded = t.slice(2, 1).to_pylist()[0]
    assert padded["I5"] == 11 and padded["I6"] is None and padded["C1"] == 0 and padded["C26"] == 0
    assert t.slice(5, 1).to_pylist()[0] == {LABEL: 1, **{c: None for c in DENSE}, **{c: 0 for c in SPARSE}}
    c1 = t["C1"].to_pylist()  # "hello" (lines 8 and 15) is an ordinary value with its own id
    assert c1[3] == c1[6] > 0 and c1[3] != c1[0]
    meta = DatasetMeta.load(tmp_path / "o")
    assert meta.extra["preprocess"]["rows_skipped"] == BAD_SKIPPED  # the summary is in meta.json


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 300])
def test_strict_fails_on_the_first_bad_row_naming_file_and_line(tmp_path, chunk_bytes):
    with pytest.raises(ct.InputError, match=r"bad_rows\.txt:4: bad label"):
        run([FIXTURES / "bad_rows.txt"], tmp_path / "o", strict=True, chunk_bytes=chunk_bytes)
    gz = tmp_path / "bad.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "bad_rows.txt").read_bytes()))
    with pytest.raises(ct.InputError, match=r"bad\.gz:4: bad label"):
        run([gz], tmp_path / "o2", strict=True, chunk_bytes=chunk_bytes)


def test_unusable_input_is_one_clear_error_naming_the_file(tmp_path, capsys):
    data = gzip.compress((FIXTURES / "kaggle_small.txt").read_bytes() * 50)
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "header_only.csv").write_text((FIXTURES / "kaggle_small.csv").read_text().splitlines()[0] + "\n")
    cases = {
        "missing.txt": "not found",
        "empty.txt": "empty",
        "empty.gz": "empty",
        "cut.gz": "truncated or corrupt gzip",
        "header_only.csv": "empty input",
    }
    for name, msg in cases.items():
        with pytest.raises(ct.InputError, match=msg) as e:
            run([tmp_path / name], tmp_path / f"out_{name}", chunk_bytes=4096)
        assert name in str(e.value)
    assert pp.main([str(tmp_path / "cut.gz"), "--out", str(tmp_path / "o"), "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.gz" in err[0] and err[0].startswith("preprocess: error:")


# ---------------------------------------------------------------------------------------------
# Restart


def _snapshot(out: Path) -> dict:
    meta = DatasetMeta.load(out)
    tables = {s: read_split(out, s) for s in meta.splits}
    counts = {c: np.load(out / "counts" / f"{c}.npy").tolist() for c in SPARSE}
    return {"splits": meta.splits, "rows": meta.rows, "card": meta.cardinalities, "tables": tables, "counts": counts}


def _assert_same(a: dict, b: dict) -> None:
    assert a["splits"] == b["splits"] and a["rows"] == b["rows"] and a["card"] == b["card"]
    assert a["counts"] == b["counts"]
    for s in a["tables"]:
        assert a["tables"][s].equals(b["tables"][s])


@pytest.mark.parametrize("name,staging", [("train.txt", True), ("train.txt.gz", True), ("train.txt.gz", False)])
def test_interrupted_run_resumes_to_the_same_output(tmp_path, monkeypatch, name, staging):
    label, dense, sparse = rows(2000, seed=5)
    ct.write_criteo_text(tmp_path / name, label, dense, sparse)
    kw = dict(chunk_bytes=60_000, staging=staging)
    run([tmp_path / name], tmp_path / "ref", keep_work=True, **kw)
    ref = _snapshot(tmp_path / "ref")
    records = sorted((tmp_path / "ref" / ".work" / "count" / "train").glob("0*.json"))
    n_chunks = len(records)
    assert n_chunks >= 7
    # The progress bar counts input bytes (compressed for .gz): all of them, once.
    assert sum(json.loads(r.read_text())["bytes"] for r in records) == (tmp_path / name).stat().st_size

    real, calls = pp_chunks._emit, []

    def crash_after(n):
        def fake(job, *a):
            calls.append(job.pass_name)
            if len(calls) > n:
                raise KeyboardInterrupt("simulated crash")
            return real(job, *a)

        return fake

    # Crash in pass 1, then in pass 2 (each rerun resumes), then between a part and its record.
    monkeypatch.setattr(pp_chunks, "_emit", crash_after(3))
    with pytest.raises(KeyboardInterrupt):
        run([tmp_path / name], tmp_path / "out", **kw)
    calls.clear()
    monkeypatch.setattr(pp_chunks, "_emit", crash_after(9))
    with pytest.raises(KeyboardInterrupt):
        run([tmp_path / name], tmp_path / "out", **kw)
    # The second run did only the count chunks the first had not finished; 10th call crashed.
    assert calls.count("count") == n_chunks - 3 and calls.count("encode") == 10 - (n_chunks - 3)
    assert not (tmp_path / "out" / "meta.json").exists()  # unfinished never looks finished

    def crash_before_record(path, obj):
        if "encode" in str(path) and path.name == "000005.json":
            raise KeyboardInterrupt("crash after the part, before its record")
        return real_write(path, obj)

    real_write = pp_chunks.write_json
    monkeypatch.setattr(pp_chunks, "_emit", real)
    monkeypatch.setattr(pp_chunks, "write_json", crash_before_record)
    with pytest.raises(KeyboardInterrupt):
        run([tmp_path / name], tmp_path / "out", **kw)
    assert (tmp_path / "out" / "parts" / "train-000005.parquet").exists()  # orphan part, redone
    monkeypatch.setattr(pp_chunks, "write_json", real_write)
    s = run([tmp_path / name], tmp_path / "out", **kw)
    if staging or not name.endswith(".gz"):  # (a gzip file without staging is one stream task)
        assert s["chunks_reused"] == {"count": n_chunks, "encode": 5}
    _assert_same(_snapshot(tmp_path / "out"), ref)


def test_rerun_of_a_finished_dataset_is_a_no_op_and_settings_are_checked(tmp_path):
    src = FIXTURES / "kaggle_small.txt"
    first = run([src], tmp_path / "o")
    assert run([src], tmp_path / "o") == first
    with pytest.raises(pp.PreprocessError, match="other settings"):
        run([src], tmp_path / "o", min_count=2)
    run([src], tmp_path / "o", min_count=2, overwrite=True)
    assert DatasetMeta.load(tmp_path / "o").extra["preprocess"]["min_count"] == 2
    (tmp_path / "notours").mkdir()
    (tmp_path / "notours" / "x").write_text("x")
    with pytest.raises(pp.PreprocessError, match="not a preprocessing output"):
        run([src], tmp_path / "notours")


def test_worker_processes_give_the_same_output(tmp_path):
    label, dense, sparse = rows(1500, seed=7)
    ct.write_criteo_text(tmp_path / "train.txt", label, dense, sparse)
    run([tmp_path / "train.txt"], tmp_path / "one", chunk_bytes=50_000, workers=1)
    run([tmp_path / "train.txt"], tmp_path / "two", chunk_bytes=50_000, workers=2)
    _assert_same(_snapshot(tmp_path / "one"), _snapshot(tmp_path / "two"))


def test_the_loader_reads_the_output(tmp_path):
    """The contract with dlrm.data.loader: every row of every split comes back, ids in range."""
    from dlrm.data.loader import ParquetLoader

    label, dense, sparse = rows(700, seed=9)
    ct.write_criteo_text(tmp_path / "train.txt", label, dense, sparse)
    run([tmp_path / "train.txt"], tmp_path / "o", chunk_bytes=30_000)
    meta = DatasetMeta.load(tmp_path / "o")
    for split in ("train", "val", "test"):
        batches = list(ParquetLoader(tmp_path / "o", split, batch_size=64, seed=0).epoch(0))
        assert sum(len(b.labels) for b in batches) == meta.rows[split] > 0
        for b in batches:
            for name, ids in b.sparse.to_dict().items():
                assert 0 <= int(ids.values().min()) and int(ids.values().max()) < meta.cardinalities[name]

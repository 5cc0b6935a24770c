"""Bad preprocessing input, one kind per test (issue 12): line endings, unlabeled files, integers
written as floats, runs that keep (almost) nothing, split plans without train, bytes that are not
text, hash mode with huge tables, and the summary's rows/s. Each asserts the exit status, the one
line, and that nothing was lost or half-written."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dlrm.data import criteo_text as ct
from dlrm.data import preprocess as pp
from dlrm.data.preprocess import checks as pp_checks
from dlrm.data.preprocess.vocab import load_counts
from dlrm.data.schema import SPARSE, DatasetMeta

CASES = Path(__file__).parent / "fixtures" / "cases"  # 40 rows of ../shared/cases (see README there)
DAY0 = CASES / "day_0"
LINES = DAY0.read_bytes().split(b"\n")[:-1]  # the 40 rows as tab-separated text


def run(inputs, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("split", "none")
    return pp.preprocess([str(p) for p in inputs], out, **kw)


def cli(capsys, *args) -> tuple[int, list[str]]:
    """Run the command line; returns (exit status, stderr lines)."""
    capsys.readouterr()
    rc = pp.main([*map(str, args), "--quiet", "--workers", "1"])
    return rc, capsys.readouterr().err.strip().splitlines()


def rows_of(out: Path) -> list[dict]:
    meta = DatasetMeta.load(out)
    return [r for s in meta.splits for f in meta.splits[s] for r in pq.read_table(out / f).to_pylist()]


def same_dataset(a: Path, b: Path) -> bool:
    counts = all((np.load(a / "counts" / f"{c}.npy") == np.load(b / "counts" / f"{c}.npy")).all() for c in SPARSE)
    return rows_of(a) == rows_of(b) and counts


def write(path: Path, lines: list[bytes], eol: bytes = b"\n") -> Path:
    path.write_bytes(b"".join(line + eol for line in lines))
    return path


def assert_nothing_written(out: Path) -> None:
    """A refused run leaves no dataset: no meta.json, no parts, no counts (maybe not even --out)."""
    assert not (out / "meta.json").exists()
    assert not any((out / d).exists() and any((out / d).iterdir()) for d in ("parts", "counts", "vocab"))


@pytest.fixture
def ref(tmp_path) -> Path:
    run([DAY0], tmp_path / "ref")
    assert DatasetMeta.load(tmp_path / "ref").rows == {"train": 40}
    return tmp_path / "ref"


# ---------------------------------------------------------------------------------------------
# 1. Line endings


@pytest.mark.parametrize("chunk_bytes,gz", [(1 << 20, False), (1000, False), (1000, True)])
def test_cr_only_line_endings_read_like_lf(tmp_path, ref, chunk_bytes, gz):
    src = CASES / "cr_only_endings.txt"
    assert b"\n" not in src.read_bytes()
    if gz:  # a stream cut into chunks at CRs, not LFs
        src = tmp_path / "cr.gz"
        src.write_bytes(gzip.compress((CASES / "cr_only_endings.txt").read_bytes()))
    s = run([src], tmp_path / "o", chunk_bytes=chunk_bytes)
    assert s["rows_in"] == 40 and s["rows_skipped"] == {} and same_dataset(tmp_path / "o", ref)


def test_crlf_and_mixed_lf_crlf_endings_read_like_lf(tmp_path, ref):
    write(tmp_path / "crlf.txt", LINES, b"\r\n")
    mixed = b"".join(line + (b"\r\n" if i % 3 else b"\n") for i, line in enumerate(LINES))
    (tmp_path / "mixed.txt").write_bytes(mixed)
    for name in ("crlf.txt", "mixed.txt"):
        s = run([tmp_path / name], tmp_path / f"o_{name}", chunk_bytes=700)
        assert s["rows_skipped"] == {} and same_dataset(tmp_path / f"o_{name}", ref)


def test_a_stray_cr_inside_a_value_skips_that_row_whole(tmp_path, ref):
    lines = list(LINES)
    lines[6] = lines[6].replace(b"\t", b"\t7\r", 1)  # line 7: I1 = "7\r<old I1>"
    lines[20] = lines[20][:-3] + b"\r" + lines[20][-3:]  # line 21: a CR inside C26
    s = run([write(tmp_path / "stray.txt", lines)], tmp_path / "o", max_bad_fraction=0.1)
    assert s["rows_in"] == 40 and s["rows_written"] == {"train": 38}  # no line was split in two
    assert s["rows_skipped"] == {ct.STRAY_EOL: 2}
    assert s["first_bad_lines"] == {ct.STRAY_EOL: ["stray.txt:7", "stray.txt:21"]}
    want = [r for i, r in enumerate(rows_of(ref)) if i not in (6, 20)]
    got = rows_of(tmp_path / "o")
    assert [r["I1"] for r in got] == [r["I1"] for r in want] and len(got) == 38


def test_cr_only_file_with_a_stray_lf_skips_that_row_whole(tmp_path):
    lines = list(LINES)
    lines[3] = lines[3].replace(b"\t", b"\n", 1)  # in a CR-only file an LF is not a line ending
    s = run([write(tmp_path / "cr.txt", lines, b"\r")], tmp_path / "o", max_bad_fraction=0.1)
    assert s["rows_in"] == 40 and s["rows_skipped"] == {ct.STRAY_EOL: 1}
    assert s["first_bad_lines"] == {ct.STRAY_EOL: ["cr.txt:4"]}


def test_lf_file_with_some_cr_only_lines_fails_naming_the_reason(tmp_path, capsys):
    data = b"".join(line + (b"\r" if i % 4 == 1 else b"\n") for i, line in enumerate(LINES))
    (tmp_path / "mixed.txt").write_bytes(data)
    rc, err = cli(capsys, tmp_path / "mixed.txt", "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1 and ct.STRAY_EOL in err[0] and "--max-bad-fraction" in err[0]
    assert_nothing_written(tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# 2. Unlabeled files


def test_unlabeled_39_field_file_is_refused_before_work(tmp_path, capsys):
    rc, err = cli(capsys, CASES / "unlabeled_39_fields.txt", "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1
    assert "unlabeled_39_fields.txt: every line has 39 fields: an unlabeled test file?" in err[0]
    assert not (tmp_path / "o").exists()


def test_csv_header_without_label_is_refused(tmp_path, capsys):
    text = (CASES / "integral_floats.csv").read_text().splitlines()
    header = text[0].split(",")[1:]  # I1..C26: no label column
    body = [",".join(line.split(",")[1:]) for line in text[1:]]
    (tmp_path / "test.csv").write_text("\n".join(["Id," + ",".join(header)] + [f"{i}," + b for i, b in enumerate(body)]) + "\n")
    rc, err = cli(capsys, tmp_path / "test.csv", "--out", tmp_path / "o", "--format", "csv")
    assert rc == 2 and len(err) == 1 and "no Label column: an unlabeled test file?" in err[0]


def test_padding_is_only_for_stripped_trailing_empty_fields(tmp_path):
    lines = list(LINES)
    lines[4] = b"\t".join(lines[4].split(b"\t")[:30])  # stripped after C16: padded, kept
    lines[9] = b"\t".join(lines[9].split(b"\t")[1:-1] + [b""])  # label dropped: 39 fields, last one empty
    assert lines[9].endswith(b"\t") and not lines[4].endswith(b"\t")
    s = run([write(tmp_path / "t.txt", lines)], tmp_path / "o", max_bad_fraction=0.1)
    assert s["rows_padded"] == 1 and s["rows_skipped"] == {ct.TOO_FEW_FIELDS: 1}
    assert s["first_bad_lines"] == {ct.TOO_FEW_FIELDS: ["t.txt:10"]} and s["rows_written"] == {"train": 39}


# ---------------------------------------------------------------------------------------------
# 3. Integers written as floats, headers


def test_integral_floats_with_a_header_parse_as_integers(tmp_path, ref, capsys):
    s = run([CASES / "integral_floats.csv"], tmp_path / "o", chunk_bytes=2000)
    assert "24.0" in (CASES / "integral_floats.csv").read_text()
    assert s["rows_in"] == 40 and s["rows_skipped"] == {} and same_dataset(tmp_path / "o", ref)
    for case in ("integral_floats.csv", "cr_only_endings.txt"):  # the command line: exit 0, nothing said
        rc, err = cli(capsys, CASES / case, "--out", tmp_path / f"cli_{case}", "--split", "none")
        assert rc == 0 and err == [] and same_dataset(tmp_path / f"cli_{case}", ref)


def test_non_integral_floats_are_bad_values_counted(tmp_path):
    text = (CASES / "integral_floats.csv").read_text().splitlines()
    f = [line.split(",") for line in text]
    f[3][0] = "0.5"  # label
    f[7][2] = "2.5"  # I2
    f[9][0], f[9][3] = "1.00", "-3."  # still integral
    (tmp_path / "f.csv").write_text("\n".join(",".join(x) for x in f) + "\n")
    s = run([tmp_path / "f.csv"], tmp_path / "o", max_bad_fraction=0.1)
    assert s["rows_skipped"] == {ct.BAD_LABEL: 1, ct.BAD_INTEGER: 1}
    assert s["first_bad_lines"] == {ct.BAD_LABEL: ["f.csv:4"], ct.BAD_INTEGER: ["f.csv:8"]}  # header is line 1
    row = rows_of(tmp_path / "o")[8 - 2]  # file line 10 = row 9; rows 3 and 7 were skipped before it
    assert row["label"] == 1 and row["I3"] == -3


def test_a_header_in_tsv_is_not_a_row(tmp_path, ref):
    header = "\t".join(ct.COLUMNS).encode()
    s = run([write(tmp_path / "h.tsv", [header, *LINES])], tmp_path / "o")
    assert s["rows_in"] == 40 and s["rows_skipped"] == {} and same_dataset(tmp_path / "o", ref)


# ---------------------------------------------------------------------------------------------
# 4. Runs that keep nothing, or too little


@pytest.mark.parametrize("mode", ["vocab", "hash"])
def test_a_run_that_writes_nothing_is_an_error(tmp_path, capsys, mode):
    bad = [b"2" + line[1:] for line in LINES]  # every label 2
    args = ["--mode", mode] + (["--max-rows", "1000"] if mode == "hash" else [])
    rc, err = cli(capsys, write(tmp_path / "bad.txt", bad), "--out", tmp_path / "o", *args, "--max-bad-fraction", "1")
    assert rc == 2 and len(err) == 1
    assert err[0] == "preprocess: error: no rows to write: all 40 rows read were skipped: bad label 40 (first at bad.txt:1)"
    assert not (tmp_path / "o" / "meta.json").exists() and not (tmp_path / "o" / "counts").exists()


def test_more_than_max_bad_fraction_skipped_is_an_error_unless_raised(tmp_path, capsys):
    lines = list(LINES)
    lines[5] = b"x" + lines[5][1:]
    lines[30] = lines[30] + b"\textra"
    src = write(tmp_path / "t.txt", lines)
    rc, err = cli(capsys, src, "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1
    assert "2 of 40 rows skipped (5.0%, more than --max-bad-fraction 0.01)" in err[0]
    assert "bad label 1 (first at t.txt:6), too many fields 1 (first at t.txt:31)" in err[0]
    assert "--max-bad-fraction 0.05" in err[0]
    assert_nothing_written(tmp_path / "o")
    rc, err = cli(capsys, src, "--out", tmp_path / "o", "--max-bad-fraction", "0.05")  # resumes the same work
    assert rc == 0
    s = DatasetMeta.load(tmp_path / "o").extra["preprocess"]
    assert s["rows_in"] == 40 == sum(s["rows_written"].values()) + sum(s["rows_skipped"].values())


# ---------------------------------------------------------------------------------------------
# 5. Splits: a plan that leaves train empty


def test_one_terabyte_day_is_refused_before_work_saying_where_days_went(tmp_path, capsys):
    rc, err = cli(capsys, DAY0, "--out", tmp_path / "o", "--dataset", "terabyte")
    assert rc == 2 and len(err) == 1
    assert "no day is left for train (day_0 (day 0) -> test+val)" in err[0]
    assert "--train-days" in err[0] and "--split kaggle" in err[0]
    assert not (tmp_path / "o").exists()
    rc, _ = cli(capsys, DAY0, "--out", tmp_path / "k", "--split", "kaggle")  # the way out it names
    assert rc == 0 and DatasetMeta.load(tmp_path / "k").rows == {"train": 35, "test": 3, "val": 2}


def test_days_plan_is_printed_before_work(tmp_path, capsys):
    day1 = write(tmp_path / "day_1", LINES[:20])
    pp.preprocess([DAY0, day1], tmp_path / "o", progress=True, workers=1)
    err = capsys.readouterr().err
    assert "splits by day: day_0 (day 0) -> train; day_1 (day 1) -> test+val" in err
    assert DatasetMeta.load(tmp_path / "o").rows == {"train": 40, "test": 10, "val": 10}


# ---------------------------------------------------------------------------------------------
# 6. Bytes that are not text


def _with_bad_bytes(lines: list[bytes]) -> list[bytes]:
    lines = list(lines)
    lines[4] = lines[4].replace(lines[4].split(b"\t")[15], b"\xff\xfe0001", 1)  # C2: not UTF-8
    lines[8] = lines[8].replace(b"\t", b"\t1\x002", 1)  # I1 with a NUL
    lines[11] = lines[11].replace(lines[11].split(b"\t")[20], "café".encode("latin-1"), 1)  # C7
    lines[13] = lines[13].replace(lines[13].split(b"\t")[20], "café".encode(), 1)  # valid UTF-8: a value
    return lines


@pytest.mark.parametrize("chunk_bytes,gz", [(1 << 20, False), (900, False), (900, True)])
def test_non_utf8_and_nul_rows_are_skipped_with_file_lines(tmp_path, chunk_bytes, gz):
    data = b"".join(line + b"\n" for line in _with_bad_bytes(LINES))
    src = tmp_path / ("b.gz" if gz else "b.txt")
    src.write_bytes(gzip.compress(data) if gz else data)
    s = run([src], tmp_path / "o", chunk_bytes=chunk_bytes, max_bad_fraction=0.1)
    assert s["rows_skipped"] == {ct.NOT_UTF8: 2, ct.NUL_BYTE: 1} and s["rows_written"] == {"train": 37}
    assert s["first_bad_lines"] == {ct.NOT_UTF8: [f"{src.name}:5", f"{src.name}:12"], ct.NUL_BYTE: [f"{src.name}:9"]}
    assert max(DatasetMeta.load(tmp_path / "o").cardinalities.values()) > 1


def test_strict_fails_on_bytes_that_are_not_text_naming_file_and_line(tmp_path, capsys):
    lines = list(LINES)
    lines[25] = lines[25].replace(b"\t", b"\t\x00", 1)
    header = ",".join(["label", *ct.COLUMNS[1:]]).encode()
    csv = [header] + [line.replace(b"\t", b",") for line in lines]
    for name, body in [("n.txt", lines), ("n.csv", csv)]:
        rc, err = cli(capsys, write(tmp_path / name, body), "--out", tmp_path / f"o_{name}", "--strict", "--chunk-mb", "0.001")
        line = 26 + (name == "n.csv")  # file lines count the header
        assert rc == 2 and len(err) == 1 and f"{name}:{line}: {ct.NUL_BYTE} (--strict" in err[0], err


# ---------------------------------------------------------------------------------------------
# 7. Hash mode with huge tables


def test_hash_mode_with_2_to_the_32_rows_keeps_counts_small(tmp_path):
    s = run([DAY0], tmp_path / "h", mode="hash", max_rows=2**32)
    meta = DatasetMeta.load(tmp_path / "h")
    assert s["rows_written"] == {"train": 40} and meta.cardinalities == {c: 2**32 for c in SPARSE}
    assert meta.extra["counts_format"] == "sparse"
    assert sum(f.stat().st_size for f in (tmp_path / "h" / "counts").iterdir()) < 200_000  # dense: 26 x 32 GiB
    rows = rows_of(tmp_path / "h")
    for c in ("C1", "C7", "C26"):
        ids, counts = load_counts(tmp_path / "h" / "counts", c)
        u, n = np.unique([r[c] for r in rows], return_counts=True)
        assert ids.tolist() == u.tolist() and counts.tolist() == n.tolist() and ids.max() < 2**32


def test_hash_counts_that_cannot_fit_are_refused_before_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pp_checks, "available_memory", lambda: 100_000)  # 100 kB free
    big = tmp_path / "big.txt"
    big.write_bytes(DAY0.read_bytes() * 50)  # 2,000 rows (at most ~13,000 by size) x 48 B > 100 kB
    with pytest.raises(pp.PreprocessError, match=r"hash counts need ~0\.0 GiB of memory per column .* GiB available"):
        run([big], tmp_path / "o", mode="hash", max_rows=2**32)
    assert not (tmp_path / "o").exists()
    with pytest.raises(pp.PreprocessError, match="beyond"):
        run([DAY0], tmp_path / "o", mode="hash", max_rows=2**63)


def test_hash_counts_refusal_on_the_command_line_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pp_checks, "available_memory", lambda: 1000)
    rc, err = cli(capsys, DAY0, "--out", tmp_path / "o", "--mode", "hash", "--max-rows", str(2**32))
    assert rc == 2 and len(err) == 1 and err[0].startswith("preprocess: error: hash counts need ~")
    assert "distinct ids per column" in err[0] and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# 8. rows/s


def test_rows_per_second_counts_the_rows_of_this_run(tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(DAY0.read_bytes() * 20)
    s = run([src], tmp_path / "o", chunk_bytes=20_000, workers=2)  # worker processes: results via the pool
    assert set(s["rows_per_s"]) == {"count", "encode"} and min(s["rows_per_s"].values()) > 0
    assert DatasetMeta.load(tmp_path / "o").extra["preprocess"]["rows_per_s"] == s["rows_per_s"]


def test_rows_per_second_of_a_resumed_run_has_no_rate_for_a_pass_it_reused(tmp_path, monkeypatch):
    from dlrm.data.preprocess import chunks

    src = tmp_path / "t.txt"
    src.write_bytes(DAY0.read_bytes() * 5)
    real = chunks._emit

    def crash_in_encode(job, *a):
        if job.pass_name == "encode":
            raise KeyboardInterrupt("simulated crash")
        return real(job, *a)

    monkeypatch.setattr(chunks, "_emit", crash_in_encode)
    with pytest.raises(KeyboardInterrupt):
        run([src], tmp_path / "o", chunk_bytes=5000)
    monkeypatch.setattr(chunks, "_emit", real)
    s = run([src], tmp_path / "o", chunk_bytes=5000)
    assert s["chunks_reused"]["count"] > 0 and s["rows_in"] == 200
    assert set(s["rows_per_s"]) == {"encode"} and s["rows_per_s"]["encode"] > 0  # count read no rows this run
    assert "rows/s: encode" in pp.format_summary(s)


def test_a_file_whose_lines_all_lost_c26_is_padded_not_refused(tmp_path):
    lines = [b"\t".join(line.split(b"\t")[:38] + [line.split(b"\t")[38] or b"deadbeef"]) for line in LINES]
    # ^ C26 empty and stripped everywhere (C25 never empty, so nothing else is stripped)
    assert all(line.count(b"\t") == 38 and not line.endswith(b"\t") for line in lines)
    s = run([write(tmp_path / "t.txt", lines)], tmp_path / "o")
    assert s["rows_padded"] == 40 and s["rows_skipped"] == {} and s["rows_written"] == {"train": 40}
    assert {r["C26"] for r in rows_of(tmp_path / "o")} == {0}

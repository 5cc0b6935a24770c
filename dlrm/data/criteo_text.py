"""Criteo click-log text: write it from numpy arrays, find it, cut it into chunks, parse a chunk.

Two text formats exist in the wild:
  tsv  the Kaggle `train.txt` and the Terabyte `day_N` files: no header, 40 tab-separated fields
       (label, I1..I13, C1..C26), an empty field is a missing value, categorical values are 8 hex
       digits; trailing empty fields are sometimes stripped.
  csv  the Kaggle competition CSV: a header `Id,Label,I1,..,C26`, comma-separated; `Id` is dropped.
Either may be gzip-compressed (detected from the magic bytes, not the file name).

Parsing is pyarrow.csv on a whole chunk (tens of MB) at a time: pure-Python splitting manages about
1M fields/s, i.e. 25k rows/s, which would make the 4.4 billion Terabyte rows take two days per pass.
"""

from __future__ import annotations

import gzip
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from dlrm.data.schema import DENSE, LABEL, SPARSE
from dlrm.io import atomic_path

COLUMNS = [LABEL, *DENSE, *SPARSE]  # the 40 fields of a tsv line, in order
CSV_HEADER = ["Id", "Label", *DENSE, *SPARSE]  # the Kaggle competition CSV header
FORMATS = ("tsv", "csv")
GZIP_MAGIC = b"\x1f\x8b"
MAX_BAD_LINES = 5  # line numbers kept per skip reason: enough to find the problem, bounded memory

# Why a row is skipped. Rows with stripped trailing fields are padded (counted, not skipped).
BAD_LABEL = "bad label"  # label missing or not 0/1
BAD_INTEGER = "bad integer"  # an I field that is not a (64-bit) integer
TOO_MANY_FIELDS = "too many fields"
EMPTY_LINE = "empty line"  # no value at all (blank line or only separators)


class InputError(ValueError):
    """Bad input that stops a run: the message names the file (and line) and the problem."""


# ---------------------------------------------------------------------------------------------
# Writing (tests and benchmarks render numpy arrays to real-format text)


def _hex8(ids: np.ndarray) -> pa.Array:
    """int ids -> 8-hex-digit strings ("0000002a"), vectorized; negative ids become null (missing)."""
    n = len(ids)
    missing = ids < 0
    v = np.where(missing, 0, ids).astype(np.uint32)
    data = np.empty((n, 8), np.uint8)
    for k in range(8):  # one vectorized pass per hex digit, most significant first
        data[:, k] = _HEX_DIGITS[(v >> np.uint32(28 - 4 * k)) & np.uint32(15)]
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    validity = pa.array(~missing).buffers()[1] if missing.any() else None
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data.reshape(-1)), validity)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


class CriteoTextWriter:
    """Appends blocks of rows to one Criteo text file (for inputs too big to hold as arrays).
    The file appears under its name only on close(); until then it is `.<name>.tmp` (dlrm.io).

        with CriteoTextWriter("day_0.gz") as w:
            for label, dense, sparse in blocks:
                w.write(label, dense, sparse)
    """

    def __init__(self, path: str | os.PathLike, *, fmt: str = "tsv", compress: bool | None = None, first_id: int = 10_000_000):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self.path, self.fmt, self.next_id = Path(path), fmt, first_id
        self._atomic = atomic_path(self.path)  # entered here, left in close() / abort()
        self.tmp = self._atomic.__enter__()
        self.raw = open(self.tmp, "wb")
        compress = self.path.name.endswith(".gz") if compress is None else compress
        # Level 1: benchmarks need GBs of gzip input quickly; the ratio hardly matters here.
        self.out = gzip.GzipFile(fileobj=self.raw, mode="wb", compresslevel=1, mtime=0) if compress else self.raw
        self.options = pa_csv.WriteOptions(include_header=False, delimiter="\t" if fmt == "tsv" else ",", quoting_style="none")
        if fmt == "csv":
            self.out.write((",".join(CSV_HEADER) + "\n").encode())

    def write(self, label: np.ndarray, dense: np.ndarray, sparse: np.ndarray, batch_rows: int = 1 << 18) -> None:
        """label [n] (0/1), dense [n,13] float (NaN = missing; rounded to integers), sparse [n,26]
        int ids (< 2**32; negative = missing), rendered as 8 hex digits."""
        n = len(label)
        if dense.shape != (n, len(DENSE)) or sparse.shape != (n, len(SPARSE)):
            raise ValueError(f"expected dense [{n},13] and sparse [{n},26], got {dense.shape}, {sparse.shape}")
        for start in range(0, n, batch_rows):
            sl = slice(start, min(n, start + batch_rows))
            cols = {}
            if self.fmt == "csv":
                cols["Id"] = pa.array(np.arange(sl.stop - sl.start, dtype=np.int64) + self.next_id)
                self.next_id += sl.stop - sl.start
            cols[LABEL] = pa.array(np.asarray(label[sl], dtype=np.int64))
            d = np.asarray(dense[sl], dtype=np.float64)
            nan = np.isnan(d)
            d = np.rint(np.where(nan, 0, d)).astype(np.int64)
            for j, name in enumerate(DENSE):
                cols[name] = pa.array(d[:, j], mask=nan[:, j])
            s = np.asarray(sparse[sl], dtype=np.int64)
            for j, name in enumerate(SPARSE):
                cols[name] = _hex8(s[:, j])
            pa_csv.write_csv(pa.table(cols), self.out, write_options=self.options)

    def close(self) -> Path:
        if self.out is not self.raw:
            self.out.close()
        self.raw.close()
        self._atomic.__exit__(None, None, None)  # renames the temporary file into place
        return self.path

    def abort(self) -> None:
        self.raw.close()
        error = RuntimeError(f"{self.path}: writing aborted")
        self._atomic.__exit__(RuntimeError, error, None)  # removes the temporary file

    def __enter__(self) -> "CriteoTextWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.abort() if exc_type else self.close()


def write_criteo_text(
    path: str | os.PathLike,
    label: np.ndarray,
    dense: np.ndarray,
    sparse: np.ndarray,
    *,
    fmt: str = "tsv",
    compress: bool | None = None,
    first_id: int = 10_000_000,
) -> Path:
    """Write rows as Criteo text: label [n] (0/1), dense [n,13] float (NaN = missing, values are
    rounded to integers), sparse [n,26] int ids (< 2**32; negative = missing) as 8 hex digits.

    fmt "tsv" (Kaggle train.txt / Terabyte day_N) or "csv" (Kaggle competition CSV with header,
    ids counting from first_id). compress: gzip; None = when the name ends in ".gz".
    Written to a temporary name and renamed, so a crash never leaves a truncated file behind.
    """
    with CriteoTextWriter(path, fmt=fmt, compress=compress, first_id=first_id) as w:
        w.write(label, dense, sparse)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Finding and opening input


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_text(path: Path) -> io.BufferedIOBase:
    """Binary reader of the (decompressed) text."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def check_input(path: Path) -> None:
    """Fail early, naming the file, on what would otherwise surface as an obscure error mid-run:
    missing, not a file, empty (also when compressed), unreadable gzip header."""
    if not path.exists():
        raise InputError(f"{path}: input file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty input file")
    try:
        with open_text(path) as f:
            first = f.read(1 << 16)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path}: cannot read: truncated or corrupt gzip? ({e})") from e
    if not first:
        raise InputError(f"{path}: empty input (nothing after decompression)")


def detect_format(path: Path) -> str:
    """'csv' when the first line is the Kaggle CSV header, 'tsv' when it holds tabs."""
    try:
        with open_text(path) as f:
            first = f.readline(1 << 16)
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    if not first.strip():
        raise InputError(f"{path}: empty input (first line is blank)")
    if first.lstrip().lower().startswith((b"id,label", b"label,")):
        return "csv"
    if b"\t" in first:
        return "tsv"
    raise InputError(f"{path}: cannot tell the format (no tab, no Id,Label header); pass --format")


def csv_header(path: Path, first_line: bytes) -> list[str]:
    """Column names of a Kaggle CSV header; it must name Label, I1..I13 and C1..C26."""
    names = first_line.decode("utf-8", "replace").strip().split(",")
    names = [LABEL if n.lower() == "label" else n for n in names]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise InputError(f"{path}: CSV header lacks columns {missing[:5]}")
    return names


# ---------------------------------------------------------------------------------------------
# Chunks: a chunk is the lines that *start* inside a byte range of the decompressed text, so it is
# defined by (file, chunk size, index) alone and a restarted run cuts exactly the same chunks.


def read_plain_chunk(path: Path, index: int, chunk_bytes: int) -> bytes:
    """Chunk `index` of an uncompressed file, by seeking (chunks of one file run in parallel)."""
    start, end = index * chunk_bytes, (index + 1) * chunk_bytes
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line that started before `start`: it belongs to index-1
        pos = f.tell()
        if pos >= end:
            return b""
        data = f.read(end - pos)
        if data and not data.endswith(b"\n"):
            data += f.readline()
    return data


def iter_stream_chunks(f: io.BufferedIOBase, chunk_bytes: int):
    """Consecutive chunks of a stream (gzip cannot seek, so its chunks are read in order)."""
    while True:
        data = f.read(chunk_bytes)
        if not data:
            return
        if not data.endswith(b"\n"):
            data += f.readline()
        yield data


def count_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass
class ParsedChunk:
    table: pa.Table  # label int8, I1..I13 int64, C1..C26 binary(8) or string; null = missing
    lines: int  # lines in the chunk (header excluded): rows read = len(table) + skipped
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    bad_lines: dict = field(default_factory=dict)  # reason -> first few 1-based lines in the chunk
    padded: int = 0  # rows with stripped trailing fields, padded as missing (kept)

    def skip(self, reason: str, lines) -> None:
        lines = list(lines)
        if lines:
            self.skipped[reason] += len(lines)
            kept = self.bad_lines.setdefault(reason, [])
            kept.extend(lines[: max(0, MAX_BAD_LINES - len(kept))])


_INT_RE = r"^-?[0-9]+$"  # what pyarrow's string -> int64 cast accepts
# Fast path: categorical values read as fixed 8-byte binary (every Criteo value is 8 hex digits).
# The column is then one flat buffer that numpy reinterprets as uint64 keys, and the parse costs
# about 60% of reading strings into a dictionary. A value of another length fails the
# conversion and sends that chunk down the (slower, general) string path.
FIXED8 = pa.binary(8)
_TYPED = {LABEL: pa.int8(), **{c: pa.int64() for c in DENSE}, **{c: FIXED8 for c in SPARSE}}
_GENERAL = {**_TYPED, **{c: pa.string() for c in SPARSE}}  # the slow path's result types
_STRINGS = {c: pa.string() for c in COLUMNS}


def _read(data: bytes, names: list[str], delimiter: str, types: dict, handler) -> pa.Table:
    return pa_csv.read_csv(
        pa.py_buffer(data),
        read_options=pa_csv.ReadOptions(
            column_names=names, use_threads=False, block_size=max(1 << 20, len(data) + 1)
        ),
        parse_options=pa_csv.ParseOptions(
            delimiter=delimiter, quote_char=False, ignore_empty_lines=False, invalid_row_handler=handler
        ),
        convert_options=pa_csv.ConvertOptions(
            column_types={n: types.get(n, pa.string()) for n in names},
            include_columns=COLUMNS,
            null_values=[""],
            strings_can_be_null=True,
        ),
    )


def _validate(strings: pa.Table, result: ParsedChunk, lines: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """All-string table -> typed table, skipping (and recording) rows with bad values.
    `lines` holds the chunk line number of every row."""
    all_null = np.ones(len(strings), bool)
    for c in COLUMNS:
        all_null &= strings[c].is_null().to_numpy(zero_copy_only=False)
    label = strings[LABEL]
    bad_label = ~pc.fill_null(pc.is_in(label, pa.array(["0", "1"])), False).to_numpy(zero_copy_only=False)
    bad_int = np.zeros(len(strings), bool)
    for c in DENSE:
        ok = pc.fill_null(pc.match_substring_regex(strings[c], _INT_RE), True)
        bad_int |= ~ok.to_numpy(zero_copy_only=False)
    # Integers too long for int64 pass the regex; find them by casting what is left.
    keep = ~(all_null | bad_label | bad_int)
    for c in DENSE:
        col = strings[c].filter(pa.array(keep))
        try:
            pc.cast(col, pa.int64())
        except pa.ArrowInvalid:
            vals = strings[c].to_pylist()
            for i in np.flatnonzero(keep):
                v = vals[i]
                if v is not None and not -(2**63) <= int(v) < 2**63:
                    bad_int[i] = True
            keep = ~(all_null | bad_label | bad_int)
    result.skip(EMPTY_LINE, lines[all_null])
    result.skip(BAD_LABEL, lines[bad_label & ~all_null])
    result.skip(BAD_INTEGER, lines[bad_int & ~bad_label & ~all_null])
    kept = strings.filter(pa.array(keep))
    return kept.cast(pa.schema([(c, _GENERAL[c]) for c in COLUMNS])), lines[keep]


def parse_chunk(data: bytes, fmt: str, names: list[str] | None = None, first_line: int = 1) -> ParsedChunk:
    """Parse one chunk of text. `names`: the column names of the file (csv: from its header);
    `first_line`: the chunk line number of data's first line (2 when data starts after a header).

    Fast path: read with the final types. If a value does not convert, read everything as strings
    and validate row by row (vectorized), so one bad row costs one slower chunk, not a crash.
    """
    delimiter = "\t" if fmt == "tsv" else ","
    names = names or COLUMNS
    lines = count_lines(data)
    result = ParsedChunk(table=None, lines=lines)
    if lines == 0:  # e.g. a chunk inside one very long line, or a csv holding only its header
        result.table = pa.table({c: pa.array([], _TYPED[c]) for c in COLUMNS})
        return result
    odd: list = []  # rows with a wrong field count: (line, text, fields)

    def handler(row):
        odd.append((row.number, row.text, row.actual_columns))
        return "skip"

    try:
        table = _read(data, names, delimiter, _TYPED, handler)
    except pa.ArrowInvalid:
        odd.clear()
        table = None
    if table is not None:
        # Typed read succeeded; still reject labels other than 0/1 and all-empty lines.
        row_lines = _row_lines(lines, odd)
        lab = table[LABEL]
        ok_label = pc.fill_null(pc.is_in(lab, pa.array([0, 1], pa.int8())), False).to_numpy(zero_copy_only=False)
        if not ok_label.all():
            all_null = np.ones(len(table), bool)
            for c in COLUMNS:
                all_null &= table[c].is_null().to_numpy(zero_copy_only=False)
            result.skip(EMPTY_LINE, row_lines[all_null])
            result.skip(BAD_LABEL, row_lines[~ok_label & ~all_null])
            table = table.filter(pa.array(ok_label))
            row_lines = row_lines[ok_label]
    else:
        strings = _read(data, names, delimiter, _STRINGS, handler)
        row_lines = _row_lines(lines, odd)
        table, row_lines = _validate(strings, result, row_lines)

    if odd:
        table, row_lines = _handle_odd(odd, len(names), delimiter, names, result, table, row_lines)
    result.table = table
    # Line numbers so far count from data's first line; shift to the chunk's numbering.
    for reason, kept in result.bad_lines.items():
        result.bad_lines[reason] = [int(n) + first_line - 1 for n in kept]
    return result


def _row_lines(lines: int, odd: list) -> np.ndarray:
    """Line number of every parsed row: all lines except those the invalid-row handler took."""
    everything = np.arange(1, lines + 1, dtype=np.int64)
    if not odd:
        return everything
    if any(n is None for n, _, _ in odd):  # only happens with threaded reading, which we never use
        raise RuntimeError("pyarrow did not report line numbers of invalid rows")
    return np.setdiff1d(everything, np.array([n for n, _, _ in odd], np.int64), assume_unique=True)


def _handle_odd(odd, width, delimiter, names, result, table, row_lines):
    """Rows with too few fields are padded with missing values (Criteo files sometimes strip
    trailing empty fields); rows with too many are skipped. Rare, so plain Python is fine."""
    too_many = [n for n, _, k in odd if k > width]
    result.skip(TOO_MANY_FIELDS, too_many)
    short = [(n, text) for n, text, k in odd if k < width]
    if not short:
        return table, row_lines
    result.padded += len(short)
    rows = [text.split(delimiter) + [""] * width for _, text in short]
    strings = pa.table({name: pa.array([r[j] or None for r in rows], pa.string()) for j, name in enumerate(names)})
    strings = strings.select(COLUMNS)
    padded, padded_lines = _validate(strings, result, np.array([n for n, _ in short], np.int64))
    result.padded -= len(short) - len(padded)  # a padded row that is then skipped is not "padded"
    # Put the padded rows back in file order: the split into train/val/test is by position.
    if table.schema != padded.schema:  # fast-path binary(8) vs strings: go general for this chunk
        general = pa.schema([(c, _GENERAL[c]) for c in COLUMNS])
        table, padded = table.cast(general), padded.cast(general)
    merged = pa.concat_tables([table, padded])
    all_lines = np.concatenate([row_lines, padded_lines])
    order = np.argsort(all_lines, kind="stable")
    return merged.take(pa.array(order)), all_lines[order]

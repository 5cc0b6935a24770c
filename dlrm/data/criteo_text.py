"""Criteo click-log text: find it, cut it into chunks, parse a chunk (writing: criteo_write).

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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from dlrm.data.schema import DENSE, LABEL, SPARSE

from dlrm.data.criteo_write import COLUMNS, CSV_HEADER, FORMATS, CriteoTextWriter, write_criteo_text  # noqa: F401

GZIP_MAGIC = b"\x1f\x8b"
MAX_BAD_LINES = 5  # line numbers kept per skip reason: enough to find the problem, bounded memory

# Why a row is skipped. Rows with stripped trailing fields are padded (counted, not skipped).
BAD_LABEL = "bad label"  # label missing or not 0/1
BAD_INTEGER = "bad integer"  # an I field that is not a (64-bit) integer
TOO_MANY_FIELDS = "too many fields"
TOO_FEW_FIELDS = "too few fields"  # short, and its last field is empty: not stripped, so not padded
EMPTY_LINE = "empty line"  # no value at all (blank line or only separators)
NUL_BYTE = "NUL byte"
NOT_UTF8 = "not UTF-8"
STRAY_EOL = "stray CR/LF inside a line"  # a line-break byte that is not this file's line ending


class InputError(ValueError):
    """Bad input that stops a run: the message names the file (and line) and the problem."""


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


def csv_header(path: Path, first_line: bytes, delimiter: str = ",") -> list[str]:
    """Column names of a header line (Kaggle CSV `Id,Label,I1..`, or `label,I1..` as pandas
    writes it, in either format); it must name Label, I1..I13 and C1..C26."""
    names = first_line.decode("utf-8", "replace").strip().split(delimiter)
    names = [LABEL if n.lower() == "label" else n for n in names]
    missing = [c for c in COLUMNS if c not in names]
    if missing == [LABEL]:
        raise InputError(f"{path}: the header has no Label column: an unlabeled test file?")
    if missing:
        raise InputError(f"{path}: header lacks columns {missing[:5]}")
    return names


EOLS = {"lf": b"\n", "cr": b"\r"}  # line endings: LF (CRLF reads as LF too) or CR only (old Mac)
_SWAP_CR_LF = bytes.maketrans(b"\r\n", b"\n\r")


def detect_eol(path: Path) -> str:
    """'cr' when the first 64 KiB of text hold more lone CRs (not part of a CRLF) than LFs: CR-only
    line endings (old Mac); else 'lf' (LF or CRLF)."""
    with open_text(path) as f:
        first = f.read(1 << 16)
    return "cr" if first.count(b"\r") - first.count(b"\r\n") > first.count(b"\n") else "lf"


def to_lf(data: bytes, eol: str) -> bytes:
    """Text with this file's line endings -> LF-terminated lines. A CR-only file's LF bytes
    become CR bytes (stray, reported as such by parse_chunk), so no value is ever split."""
    return data.translate(_SWAP_CR_LF) if eol == "cr" else data


def first_lines(path: Path, eol: str, limit: int = 1 << 16) -> list[bytes]:
    """The whole lines within the first `limit` bytes of text (LF form, without line endings)."""
    with open_text(path) as f:
        block = to_lf(f.read(limit), eol)
    lines = block.split(b"\n")
    if len(block) == limit or lines[-1] == b"":
        lines.pop()  # cut short by the limit, or the nothing after the last LF
    return [line.removesuffix(b"\r") for line in lines]


def read_header(path: Path, fmt: str, eol: str) -> list[str] | None:
    """Column names from the file's header line, or None when it has none (tsv: the first line is
    a header when it names label, I1 and C1; csv: always has one)."""
    lines = first_lines(path, eol)
    if not lines:
        return None
    delimiter = "\t" if fmt == "tsv" else ","
    fields = {f.strip().lower() for f in lines[0].decode("utf-8", "replace").split(delimiter)}
    if fmt == "csv" or {"label", "i1", "c1"} <= fields or {"id", "i1", "c1"} <= fields:
        return csv_header(path, lines[0], delimiter)
    return None


def check_labeled(path: Path, fmt: str, eol: str, header: bool) -> None:
    """Refuse a file whose lines all have 39 fields (Kaggle's test.txt: no label column). Padding
    is for stripped trailing empty fields; a whole file one field short is another file."""
    sep = b"\t" if fmt == "tsv" else b","
    lines = [line for line in first_lines(path, eol)[1 if header else 0 :] if line.strip(sep + b" ")]
    short = all(line.count(sep) == len(COLUMNS) - 2 for line in lines)
    # Yet a file whose lines all lost exactly one trailing empty field (C26) is a training file:
    # its lines never end in a separator and start with a 0/1 label.
    stripped = not any(line.endswith(sep) or line.split(sep, 1)[0] not in (b"0", b"1") for line in lines)
    if lines and short and not stripped:
        raise InputError(
            f"{path}: every line has 39 fields: an unlabeled test file? "
            f"(first {len(lines)} lines; training data has 40, the label first)"
        )


# ---------------------------------------------------------------------------------------------
# Chunks: a chunk is the lines that *start* inside a byte range of the decompressed text, so it is
# defined by (file, chunk size, index) alone and a restarted run cuts exactly the same chunks.


def _rest_of_line(f, eol: bytes) -> bytes:
    """Read through the next `eol` (LF: readline; CR: peek, since readline only knows LF)."""
    if eol == b"\n":
        return f.readline()
    out = []
    while True:
        buf = f.peek(1 << 16)
        if not buf:
            break
        i = buf.find(eol)
        if i >= 0:
            out.append(f.read(i + 1))
            break
        out.append(f.read(len(buf)))
    return b"".join(out)


def read_plain_chunk(path: Path, index: int, chunk_bytes: int, eol: bytes = b"\n") -> bytes:
    """Chunk `index` of an uncompressed file, by seeking (chunks of one file run in parallel)."""
    start, end = index * chunk_bytes, (index + 1) * chunk_bytes
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            _rest_of_line(f, eol)  # finish the line that started before `start`: it belongs to index-1
        pos = f.tell()
        if pos >= end:
            return b""
        data = f.read(end - pos)
        if data and not data.endswith(eol):
            data += _rest_of_line(f, eol)
    return data


def iter_stream_chunks(f: io.BufferedIOBase, chunk_bytes: int, eol: bytes = b"\n"):
    """Consecutive chunks of a stream (gzip cannot seek, so its chunks are read in order)."""
    while True:
        data = f.read(chunk_bytes)
        if not data:
            return
        if not data.endswith(eol):
            data += _rest_of_line(f, eol)
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
_INTEGRAL_FLOAT = r"^(-?[0-9]+)\.0*$"  # `24.0`, `1.`: the integer before the point
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
    for c in (LABEL, *DENSE):  # integers written as floats (pandas: `24.0`, label `1.0`) are integers
        col = strings[c]
        if pc.any(pc.match_substring(col, ".")).as_py():
            strings = strings.set_column(strings.schema.get_field_index(c), c, pc.replace_substring_regex(col, _INTEGRAL_FLOAT, r"\1"))
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
    """Parse one chunk of LF-terminated text (see to_lf). `names`: the column names of the file
    (csv: from its header); `first_line`: the chunk line number of data's first line (2 when data
    starts after a header).

    Lines holding bytes pyarrow would misread (NUL, invalid UTF-8, a CR or LF that is not the line
    ending) are taken out first and skipped whole, with their reason. Fast path: read with the
    final types. If a value does not convert, read everything as strings and validate row by row
    (vectorized), so one bad row costs one slower chunk, not a crash.
    """
    lines = count_lines(data)
    bad = _screen(data)
    if not bad:
        result = _parse(data, fmt, names or COLUMNS, lines)
    else:  # rare: parse the other lines, then put the line numbers back
        drop = np.array(sorted(n for ns in bad.values() for n in ns), np.int64)
        parts = data.split(b"\n")
        if parts[-1] == b"":
            parts.pop()
        keep = np.setdiff1d(np.arange(1, lines + 1, dtype=np.int64), drop, assume_unique=True)
        clean = b"".join(parts[i - 1] + b"\n" for i in keep.tolist())
        result = _parse(clean, fmt, names or COLUMNS, len(keep))
        result.lines = lines
        result.bad_lines = {r: keep[np.array(ns, np.int64) - 1].tolist() for r, ns in result.bad_lines.items()}
        for reason, ns in bad.items():
            result.skip(reason, ns)
        result.bad_lines = {r: sorted(ns)[:MAX_BAD_LINES] for r, ns in result.bad_lines.items()}
    # Line numbers so far count from data's first line; shift to the chunk's numbering.
    for reason, kept in result.bad_lines.items():
        result.bad_lines[reason] = [int(n) + first_line - 1 for n in kept]
    return result


_HIGH_SURROGATE = re.compile("[\udc80-\udcff]")  # invalid UTF-8 bytes, as surrogateescape decodes them
_STRAY_CR = re.compile(rb"\r(?!\n)(?!\Z)")  # a CR that does not end a line (CRLF, or the last byte)


def _screen(data: bytes) -> dict[str, list[int]]:
    """Lines (1-based) holding a NUL, invalid UTF-8, or a stray CR, by reason (one reason per
    line). Costs a few memchr-speed scans on clean ASCII text; the slow searches run only when
    one of them finds something."""
    found: dict[int, str] = {}

    def mark(reason: str, positions, text) -> None:
        line, last = 1, 0
        for pos in positions:
            line += text.count(b"\n" if isinstance(text, bytes) else "\n", last, pos)
            last = pos
            found.setdefault(line, reason)

    if b"\x00" in data:
        mark(NUL_BYTE, (m.start() for m in re.finditer(b"\x00", data)), data)
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", "surrogateescape")
            mark(NOT_UTF8, (m.start() for m in _HIGH_SURROGATE.finditer(text)), text)
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):  # `in` first: count is 4x slower
        mark(STRAY_EOL, (m.start() for m in _STRAY_CR.finditer(data)), data)
    bad: dict[str, list[int]] = {}
    for line in sorted(found):
        bad.setdefault(found[line], []).append(line)
    return bad


def _parse(data: bytes, fmt: str, names: list[str], lines: int) -> ParsedChunk:
    delimiter = "\t" if fmt == "tsv" else ","
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
    # Stripping trailing empty fields leaves a line whose last field is not empty; a short line
    # that ends in an empty field lost fields somewhere else (e.g. no label column).
    result.skip(TOO_FEW_FIELDS, [n for n, text in short if text.endswith(delimiter) and text.strip(delimiter)])
    short = [(n, text) for n, text in short if not text.endswith(delimiter) or not text.strip(delimiter)]
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

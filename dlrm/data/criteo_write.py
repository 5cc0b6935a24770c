"""Criteo click-log text written from numpy arrays (tests and benchmarks render real-format input).

The formats are described in dlrm.data.criteo_text, which reads them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from dlrm.data.schema import DENSE, LABEL, SPARSE
from dlrm.io import atomic_path

COLUMNS = [LABEL, *DENSE, *SPARSE]  # the 40 fields of a tsv line, in order
CSV_HEADER = ["Id", "Label", *DENSE, *SPARSE]  # the Kaggle competition CSV header
FORMATS = ("tsv", "csv")


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

"""What determines a preprocessing output, and where a run keeps its work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from dlrm.data.schema import DENSE, LABEL, SPARSE

VERSION = 2  # bump when the output of a chunk changes, so old work dirs are not reused
WORK = ".work"
PARTS = "parts"
COUNTS = "counts"
VOCAB = "vocab"
OUT_SCHEMA = pa.schema(
    [(LABEL, pa.int8()), *[(c, pa.int64()) for c in DENSE], *[(c, pa.int64()) for c in SPARSE]]
)
# Per-chunk counts: one IPC record batch per categorical column for its 8-byte values (key) and
# one per column for other strings (value); random access per column when merging.
COUNT_SCHEMA = pa.schema([("key", pa.uint64()), ("value", pa.string()), ("count", pa.int64())])


@dataclass
class Settings:
    """Everything that determines the output. A work dir is only resumed with the same settings."""

    inputs: list[str]
    formats: list[str]  # per input: tsv | csv
    eols: list[str]  # per input: lf (LF or CRLF) | cr (CR only)
    headers: list[bool]  # per input: its first line is a header, not a row
    mode: str = "vocab"  # vocab | hash
    min_count: int = 1  # vocab: values seen fewer times map to id 0
    max_rows: int = 0  # vocab: keep the max_rows-1 most frequent values; hash: table rows
    chunk_bytes: int = 64 << 20
    row_group_rows: int = 65536
    staging: bool = True  # vocab mode: keep pass 1's parsed rows (zstd Arrow IPC) for pass 2
    split: str = "auto"  # auto | kaggle | days | none
    train_days: list[int] | None = None
    val_days: list[int] | None = None
    test_days: list[int] | None = None
    version: int = VERSION


class PreprocessError(RuntimeError):
    """A run cannot continue; the message says why and what to do."""



# Work layout: a chunk counts as done only when its record exists (written after its outputs).


def record_path(out: Path, pass_name: str, fid: str, k: int) -> Path:
    return out / WORK / pass_name / fid / f"{k:06d}.json"


def stream_done_path(out: Path, pass_name: str, fid: str) -> Path:
    return out / WORK / pass_name / fid / "done.json"


def stage_path(out: Path, fid: str, k: int) -> Path:
    return out / WORK / "stage" / fid / f"{k:06d}.arrow"

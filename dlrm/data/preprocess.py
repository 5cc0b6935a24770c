"""Criteo text (Kaggle train.txt, Terabyte day_N, plain or .gz) -> the parquet layout the loader reads.

    python -m dlrm.data.preprocess data/raw/train.txt --out data/criteo-kaggle
    python -m dlrm.data.preprocess data/raw/day_{0..23}.gz --out data/criteo-1tb --min-count 15
    python -m dlrm.data.preprocess data/raw/day_*.gz --out data/criteo-1tb-h40m --mode hash --max-rows 40000000

Bounded memory, restartable, parallel:
  * Input files are cut into chunks of --chunk-mb of text (see criteo_text); every chunk is one unit
    of work: parsed, processed, written under a temporary name and renamed, then recorded in the
    manifest (.work/<pass>/<file>/<chunk>.json). A rerun skips recorded chunks, so a crash costs at
    most the chunks in flight; an output without a record is redone.
  * vocab mode (default): pass 1 parses each chunk, counts every categorical value and stages the
    parsed rows (zstd Arrow IPC; --no-staging parses the text again instead); the per-chunk counts
    are merged one column at a time into a vocabulary ordered by frequency (id 0 = missing or
    rarer than --min-count, id 1 = most frequent); pass 2 encodes. Memory grows with the
    vocabulary and --chunk-mb x --workers, never with the number of rows.
  * hash mode: one pass; id = 1 + mix64(value) mod (max_rows - 1), id 0 = missing.
  * Last, the chunk outputs are assigned to train/val/test by row position (a chunk straddling a
    boundary is sliced) and meta.json is written: its presence means the dataset is complete.

Categorical values that are exactly 8 bytes long (all of Criteo's 8-hex-digit values) are keyed by
those 8 bytes packed into a uint64 (exact, no hashing); any other string is kept as a string.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from dlrm.data import criteo_text as ct
from dlrm.data.schema import DENSE, LABEL, META_FILE, SPARSE, DatasetMeta

log = logging.getLogger(__name__)
VERSION = 1  # bump when the output of a chunk changes, so old work dirs are not reused
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
    formats: list[str]
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


# ---------------------------------------------------------------------------------------------
# Keys: categorical string -> uint64


@dataclass
class ColumnKeys:
    """One categorical column of a chunk as numbers: the rows holding an 8-byte value get its 8
    bytes packed big-endian into a uint64 key (exact, and key order = byte order); the rare rows
    holding a string of another length keep it as a Python string."""

    keys: np.ndarray  # uint64 [rows with an 8-byte value]
    rows8: np.ndarray  # bool [n]: which rows those are
    other_rows: np.ndarray  # int [m]: rows with a non-8-byte value
    other: list[str]  # [m]: their values
    # rows in neither: missing (id 0)


def column_keys(col: pa.ChunkedArray) -> ColumnKeys:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(arr)
    valid = ~arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(n, bool)
    bufs = arr.buffers()
    if pa.types.is_fixed_size_binary(arr.type):  # the fast path: one flat buffer of 8-byte values
        raw = np.frombuffer(bufs[1], np.uint8, count=8 * n, offset=8 * arr.offset) if n else np.zeros(0, np.uint8)
        keys = raw.view(">u8").astype(np.uint64)
        return ColumnKeys(keys[valid], valid, np.zeros(0, np.int64), [])
    # Strings (the general path): gather the 8-byte values from the Arrow buffers.
    offsets = np.frombuffer(bufs[1], np.int32, count=n + 1, offset=4 * arr.offset) if n else np.zeros(1, np.int32)
    data = np.frombuffer(bufs[2], np.uint8) if n and bufs[2] is not None else np.zeros(0, np.uint8)
    rows8 = valid & (np.diff(offsets) == 8)
    starts = offsets[:-1][rows8]
    keys = data[starts[:, None] + np.arange(8)].reshape(-1).view(">u8").astype(np.uint64)
    other_rows = np.flatnonzero(valid & ~rows8)
    other = arr.take(pa.array(other_rows)).to_pylist() if len(other_rows) else []
    return ColumnKeys(keys, rows8, other_rows, other)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads keys (8-hex values are far from uniform) before the modulo."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def string_hash64(strings: list[str]) -> np.ndarray:
    """Stable 64-bit key of strings that are not 8 bytes (rare in Criteo): blake2b, not hash()."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in strings],
        np.uint64,
    )


# ---------------------------------------------------------------------------------------------
# Encoders (built once per worker process and reused for every chunk)

SMALL_VOCAB = 1 << 20  # up to this many keys a hash index (pandas) is built per worker; beyond,
# binary search in the memory-mapped sorted keys (shared between workers via the page cache)


class VocabEncoder:
    """Looks values up in the merged vocabulary (vocab/<C>.keys.npy sorted, .ids.npy)."""

    def __init__(self, out: Path):
        self.keys, self.ids, self.other, self.index = {}, {}, {}, {}
        for c in SPARSE:
            self.keys[c] = np.load(out / VOCAB / f"{c}.keys.npy", mmap_mode="r")
            self.ids[c] = np.load(out / VOCAB / f"{c}.ids.npy", mmap_mode="r")
            if len(self.keys[c]) <= SMALL_VOCAB:
                # A hash lookup costs ~30 ns/value against ~100+ for sort + binary search.
                self.index[c] = pd.Index(np.asarray(self.keys[c]))
                self.ids[c] = np.asarray(self.ids[c])
            other = out / VOCAB / f"{c}.other.parquet"
            if other.exists():
                t = pq.read_table(other)
                self.other[c] = dict(zip(t["value"].to_pylist(), t["id"].to_pylist()))
            else:
                self.other[c] = {}

    def lookup(self, c: str, q: np.ndarray) -> np.ndarray:
        table, ids = self.keys[c], self.ids[c]
        if len(table) == 0 or len(q) == 0:
            return np.zeros(len(q), np.int64)
        if c in self.index:
            pos = self.index[c].get_indexer(q)
            return np.where(pos >= 0, ids[pos], 0)
        order = np.argsort(q)  # sorted needles: neighbouring searches touch neighbouring pages
        sq = q[order]
        pos = np.minimum(np.searchsorted(table, sq), len(table) - 1)
        out = np.empty(len(q), np.int64)
        out[order] = np.where(table[pos] == sq, ids[pos], 0)
        return out

    def __call__(self, c: str, ck: ColumnKeys, n: int) -> np.ndarray:
        out = np.zeros(n, np.int64)
        out[ck.rows8] = self.lookup(c, ck.keys)
        if len(ck.other_rows):
            other = self.other[c]
            out[ck.other_rows] = [other.get(v, 0) for v in ck.other]
        return out


class HashEncoder:
    def __init__(self, max_rows: int):
        self.buckets = np.uint64(max_rows - 1)

    def ids(self, keys: np.ndarray) -> np.ndarray:
        return (mix64(keys) % self.buckets + np.uint64(1)).astype(np.int64)

    def __call__(self, c: str, ck: ColumnKeys, n: int) -> np.ndarray:
        out = np.zeros(n, np.int64)
        out[ck.rows8] = self.ids(ck.keys)
        if len(ck.other_rows):
            out[ck.other_rows] = self.ids(string_hash64(ck.other))
        return out


# ---------------------------------------------------------------------------------------------
# Small file helpers: everything is written to a temporary name and renamed into place.


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)


def _write_parquet(path: Path, table: pa.Table, row_group_rows: int) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=row_group_rows)
    tmp.replace(path)


def _write_ipc(path: Path, table: pa.Table, compression: str | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
            writer.write_table(table)
    tmp.replace(path)


def _write_counts(path: Path, batches: list[pa.RecordBatch]) -> None:
    # zstd: a chunk's counts shrink ~4x (to ~4% of its text) for ~0.04 s; Terabyte has ~17k chunks.
    tmp = path.with_name(path.name + ".tmp")
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, COUNT_SCHEMA, options=options) as writer:
        for b in batches:
            writer.write_batch(b)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# One chunk of work (runs in a worker process)


@dataclass
class Job:
    """What a worker needs to process chunks of one pass; small and picklable."""

    out: str
    pass_name: str  # count | encode
    settings: Settings
    fids: list[str]  # per input file: the name its chunk outputs carry
    names: list[list[str]]  # per input file: its column names (csv: from the header)
    strict: bool = False


def _record_path(out: Path, pass_name: str, fid: str, k: int) -> Path:
    return out / WORK / pass_name / fid / f"{k:06d}.json"


def _stream_done_path(out: Path, pass_name: str, fid: str) -> Path:
    return out / WORK / pass_name / fid / "done.json"


_ENCODER = None  # per worker process: (key, encoder)
_PROGRESS = None  # per worker process: queue of (bytes_in, rows_in) for the parent's progress bar


def _init_worker(progress_queue) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue
    pa.set_cpu_count(1)  # parallelism comes from worker processes; no nested thread pools
    pa.set_io_thread_count(1)


def _encoder(job: Job):
    global _ENCODER
    key = (job.out, job.settings.mode, job.settings.max_rows)
    if _ENCODER is None or _ENCODER[0] != key:
        enc = VocabEncoder(Path(job.out)) if job.settings.mode == "vocab" else HashEncoder(job.settings.max_rows)
        _ENCODER = (key, enc)
    return _ENCODER[1]


def _process_chunk(job: Job, fi: int, k: int, data: bytes, line0: int, in_bytes: int) -> dict:
    """Parse chunk k of file fi, then emit the pass's outputs and record.
    line0: lines of the file before this chunk, or -1 when unknown (parallel plain chunks)."""
    s = job.settings
    path, fmt = Path(s.inputs[fi]), s.formats[fi]
    first_line = 1
    if fmt == "csv" and k == 0:  # the header belongs to chunk 0 and is not a row
        _, _, data = data.partition(b"\n")
        first_line = 2
    parsed = ct.parse_chunk(data, fmt, job.names[fi], first_line=first_line)
    table = parsed.table
    if len(table) + sum(parsed.skipped.values()) != parsed.lines:
        raise RuntimeError(f"{path} chunk {k}: rows do not add up ({len(table)} kept, {parsed.skipped})")
    if job.strict and parsed.skipped:
        line, reason = min((n, r) for r, lines in parsed.bad_lines.items() for n in lines)  # the first
        if line0 < 0:  # lines starting before byte k*B: the first, plus one per newline before k*B-1
            line0 = _newlines(path, k * s.chunk_bytes - 1) + 1 if k else 0
        raise ct.InputError(f"{path}:{line0 + line}: {reason} (--strict: no row may be skipped)")
    record = {
        "lines": parsed.lines + first_line - 1,  # physical lines, the header included
        "rows_in": parsed.lines,
        "rows": len(table),
        "skipped": dict(parsed.skipped),
        "bad_lines": parsed.bad_lines,
        "padded": parsed.padded,
        "bytes": in_bytes,
        "output": None,
    }
    return _emit(job, fi, k, table, record)


def _stage_path(out: Path, fid: str, k: int) -> Path:
    return out / WORK / "stage" / fid / f"{k:06d}.arrow"


def _encode_staged(job: Job, fi: int, k: int) -> dict:
    """Pass 2 from pass 1's parsed rows: no second parse of the text."""
    out, fid = Path(job.out), job.fids[fi]
    stage = _stage_path(out, fid, k)
    record = json.loads(_record_path(out, "count", fid, k).read_text())
    if not stage.exists():
        raise PreprocessError(f"{stage}: staged rows missing (work dir edited?); rerun with --overwrite")
    with pa.OSFile(str(stage)) as src:  # read into memory: safe to use after close
        table = pa.ipc.open_file(src).read_all()
    record = _emit(job, fi, k, table, {**record, "output": None})
    stage.unlink()  # its rows are in the part now; staging is the largest thing in .work
    return record


def _emit(job: Job, fi: int, k: int, table: pa.Table, record: dict) -> dict:
    """Write what this pass makes of a chunk's rows, then the record that marks the chunk done."""
    s, out, fid = job.settings, Path(job.out), job.fids[fi]
    work = out / WORK / job.pass_name / fid
    work.mkdir(parents=True, exist_ok=True)
    if job.pass_name == "count":
        _write_counts(work / f"{k:06d}.arrow", _count_batches(table))
        record["output"] = str((work / f"{k:06d}.arrow").relative_to(out))
        if s.staging:
            stage = _stage_path(out, fid, k)
            stage.parent.mkdir(parents=True, exist_ok=True)
            _write_ipc(stage, table, "zstd")
    else:
        enc = _encoder(job)
        cols = {LABEL: table[LABEL], **{c: table[c] for c in DENSE}}
        id_counts = []
        for c in SPARSE:
            ids = enc(c, column_keys(table[c]), len(table))
            cols[c] = pa.array(ids)
            if s.mode == "hash":  # the only pass in hash mode: count ids here
                u, n = np.unique(ids, return_counts=True)
                id_counts.append(pa.record_batch([pa.array(u.astype(np.uint64)), pa.nulls(len(u), pa.string()), pa.array(n.astype(np.int64))], schema=COUNT_SCHEMA))
        if len(table):
            part = out / PARTS / f"{fid}-{k:06d}.parquet"
            part.parent.mkdir(exist_ok=True)
            _write_parquet(part, pa.table(cols, schema=OUT_SCHEMA), s.row_group_rows)
            record["output"] = str(part.relative_to(out))
        if s.mode == "hash":
            _write_counts(work / f"{k:06d}.arrow", id_counts)
    _write_json(_record_path(out, job.pass_name, fid, k), record)
    if _PROGRESS is not None:
        _PROGRESS.put((record["bytes"], record["rows_in"]))
    return record


def _count_batches(table: pa.Table) -> list[pa.RecordBatch]:
    """Per column: counts of its 8-byte values (batch c) and other strings (batch 26 + c)."""
    packed, other = [], []
    for c in SPARSE:
        ck = column_keys(table[c])
        vc = pc.value_counts(pa.array(ck.keys))  # hash aggregation; about 30 ns per value
        keys, counts = vc.field("values"), vc.field("counts").cast(pa.int64())
        packed.append(pa.record_batch([keys, pa.nulls(len(keys), pa.string()), counts], schema=COUNT_SCHEMA))
        agg = Counter(ck.other)
        other.append(
            pa.record_batch(
                [pa.array(np.zeros(len(agg), np.uint64)), pa.array(list(agg), pa.string()), pa.array(list(agg.values()), pa.int64())],
                schema=COUNT_SCHEMA,
            )
        )
    return packed + other


def _merge_counts(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum counts of equal keys; returns sorted unique keys."""
    k = np.concatenate(keys)
    c = np.concatenate(counts).astype(np.int64)
    if len(k) == 0:
        return k.astype(np.uint64), c
    order = np.argsort(k)
    k, c = k[order], c[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return k[starts], np.add.reduceat(c, starts)


def _newlines(path: Path, offset: int) -> int:
    """Newlines in the first `offset` bytes (only for an error message: where is the bad line)."""
    n = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 16 << 20))
            if not block:
                break
            n += block.count(b"\n")
            offset -= len(block)
    return n


def _run_task(job: Job, task: tuple) -> list[dict]:
    """('plain', fi, k): one chunk of an uncompressed file. ('stream', fi): every chunk of a gzip
    file in order (it cannot seek), skipping the chunks already recorded. ('staged', fi, k): one
    chunk of pass 2 from pass 1's staged rows (any input, gzip too, runs in parallel)."""
    s, out = job.settings, Path(job.out)
    fi = task[1]
    path = Path(s.inputs[fi])
    if task[0] == "staged":
        return [_encode_staged(job, fi, task[2])]
    if task[0] == "plain":
        k = task[2]
        data = ct.read_plain_chunk(path, k, s.chunk_bytes)
        return [_process_chunk(job, fi, k, data, -1, len(data))]
    fid, records, line0 = job.fids[fi], [], 0
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
        chunks, pos = ct.iter_stream_chunks(f, s.chunk_bytes), 0
        for k in itertools.count():
            try:
                data = next(chunks)
            except StopIteration:
                break
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise ct.InputError(f"{path}: truncated or corrupt gzip after {k} chunks ({e})") from e
            in_bytes, pos = raw.tell() - pos, raw.tell()  # compressed bytes: what the bar counts
            done = _record_path(out, job.pass_name, fid, k)
            if done.exists():
                rec = json.loads(done.read_text())
                if _PROGRESS is not None:
                    _PROGRESS.put((in_bytes, rec["rows_in"]))
            else:
                rec = _process_chunk(job, fi, k, data, line0, in_bytes)
            line0 += rec["lines"]
            records.append(rec)
    _write_json(_stream_done_path(out, job.pass_name, fid), {"chunks": len(records)})
    return records


class Workers:
    """Worker processes, spawned once per run and shared by all passes; in-process when n <= 1
    (simplest to debug, and what most tests use)."""

    def __init__(self, n: int):
        self.pool = None
        if n > 1:
            ctx = mp.get_context("spawn")  # fork after pyarrow started its threads can deadlock
            self.queue = ctx.Queue()
            self.pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(self.queue,))
        else:
            self.queue = queue.SimpleQueue()

    def map(self, fn, calls: list[tuple], on_progress=None) -> list:
        """fn(*args) for each args, results in order; progress messages go to on_progress."""

        def drain():
            while True:
                try:
                    msg = self.queue.get_nowait()
                except queue.Empty:
                    return
                if on_progress is not None:
                    on_progress(msg)

        if self.pool is None:
            global _PROGRESS
            saved, _PROGRESS = _PROGRESS, self.queue
            try:
                results = []
                for args in calls:
                    results.append(fn(*args))
                    drain()
                return results
            finally:
                _PROGRESS = saved
        futures = [self.pool.submit(fn, *args) for args in calls]
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for f in finished:
                    f.result()  # a worker's error surfaces here, with its own message
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        drain()
        return [f.result() for f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# A pass over all inputs


def _plain_chunks(path: Path, chunk_bytes: int) -> int:
    return max(1, math.ceil(path.stat().st_size / chunk_bytes))


def _run_pass(job: Job, workers: "Workers", progress: bool, desc: str) -> tuple[int, int]:
    """Run every unfinished chunk of a pass; returns (chunks already done, rows read this run)."""
    s, out = job.settings, Path(job.out)
    tasks, done_bytes, done_rows, reused = [], 0, 0, 0
    staged = job.pass_name == "encode" and s.mode == "vocab" and s.staging
    for fi, p in enumerate(s.inputs):
        path, fid = Path(p), job.fids[fi]
        if staged:  # one task per chunk of pass 1
            for k, r in enumerate(_file_records(out, "count", fid, _n_chunks(out, s, fi, fid))):
                if _record_path(out, job.pass_name, fid, k).exists():
                    reused += 1
                    done_bytes += r["bytes"]
                    done_rows += r["rows_in"]
                else:
                    tasks.append(("staged", fi, k))
            continue
        if ct.is_gzip(path):
            if _stream_done_path(out, job.pass_name, fid).exists():
                recs = _file_records(out, job.pass_name, fid, None)
                reused += len(recs)
                done_bytes += path.stat().st_size
                done_rows += sum(r["rows_in"] for r in recs)
            else:
                tasks.append(("stream", fi))  # reports its finished chunks as it passes them
            continue
        for k in range(_plain_chunks(path, s.chunk_bytes)):
            rec = _record_path(out, job.pass_name, fid, k)
            if rec.exists():
                r = json.loads(rec.read_text())
                reused += 1
                done_bytes += r["bytes"]
                done_rows += r["rows_in"]
            else:
                tasks.append(("plain", fi, k))
    total = sum(Path(p).stat().st_size for p in s.inputs)
    bar = tqdm(total=total, initial=done_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True)
    rows, t0 = 0, time.perf_counter()

    def advance(nbytes, nrows):
        nonlocal rows
        rows += nrows
        bar.update(nbytes)
        bar.set_postfix_str(f"{done_rows + rows:,} rows, {rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s", refresh=False)

    try:
        workers.map(_run_task, [(job, t) for t in tasks], lambda msg: advance(*msg))
    finally:
        bar.close()
    return reused, rows


def _file_records(out: Path, pass_name: str, fid: str, n_chunks: int | None) -> list[dict]:
    """A file's chunk records in order (n_chunks None: a stream file, count from its done.json)."""
    if n_chunks is None:
        n_chunks = json.loads(_stream_done_path(out, pass_name, fid).read_text())["chunks"]
    recs = []
    for k in range(n_chunks):
        p = _record_path(out, pass_name, fid, k)
        if not p.exists():
            raise PreprocessError(f"{p}: missing chunk record after the pass finished (work dir edited?)")
        recs.append(json.loads(p.read_text()))
    return recs


def _n_chunks(out: Path, s: Settings, fi: int, fid: str) -> int:
    path = Path(s.inputs[fi])
    if not ct.is_gzip(path):
        return _plain_chunks(path, s.chunk_bytes)
    first_pass = "count" if s.mode == "vocab" else "encode"  # the pass that streamed the file
    return json.loads(_stream_done_path(out, first_pass, fid).read_text())["chunks"]


def _all_records(job: Job) -> list[list[dict]]:
    s, out = job.settings, Path(job.out)
    return [_file_records(out, job.pass_name, fid, _n_chunks(out, s, fi, fid)) for fi, fid in enumerate(job.fids)]


# ---------------------------------------------------------------------------------------------
# Vocabulary (vocab mode) and id counts


def _merge_column(out: str, ci: int, count_files: list[str], rows: int, min_count: int, max_rows: int) -> int:
    """Merge one column's per-chunk counts into vocab/<C>.{keys,ids}.npy (+ .other.parquet) and
    counts/<C>.npy. Merges in batches so memory stays about twice the column's vocabulary."""
    out, c = Path(out), SPARSE[ci]
    keys, counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    pend_k, pend_c, pending = [], [], 0
    other = Counter()
    for f in count_files:
        with pa.OSFile(str(out / f)) as src:  # read into memory: safe to use after close
            reader = pa.ipc.open_file(src)
            b = reader.get_batch(ci)
            pend_k.append(b.column(0).to_numpy())
            pend_c.append(b.column(2).to_numpy())
            pending += b.num_rows
            ob = reader.get_batch(len(SPARSE) + ci)
            if ob.num_rows:
                for v, n in zip(ob.column(1).to_pylist(), ob.column(2).to_pylist()):
                    other[v] += n
        if pending > max(2 * len(keys), 1 << 22):
            keys, counts = _merge_counts([keys, *pend_k], [counts, *pend_c])
            pend_k, pend_c, pending = [], [], 0
    keys, counts = _merge_counts([keys, *pend_k], [counts, *pend_c])

    # Order: count descending; ties: 8-byte values before other strings, then by value.
    keep = counts >= min_count
    keys, counts = keys[keep], counts[keep]
    okeys = sorted((v for v, n in other.items() if n >= min_count), key=lambda v: (-other[v], v))
    ocounts = np.array([other[v] for v in okeys], np.int64)
    by_rank = np.lexsort((keys, -counts))  # packed candidates in id order
    all_counts = np.concatenate([counts[by_rank], ocounts])
    kind = np.concatenate([np.zeros(len(keys), np.int8), np.ones(len(okeys), np.int8)])
    rank = np.concatenate([np.arange(len(keys)), np.arange(len(okeys))])
    order = np.lexsort((rank, kind, -all_counts))  # position in `order` + 1 = id
    n_ids = len(order) if max_rows <= 0 else min(len(order), max_rows - 1)
    ids_of = np.zeros(len(order), np.int64)
    ids_of[order[:n_ids]] = np.arange(1, n_ids + 1)  # values beyond the cap keep id 0
    packed_ids = np.zeros(len(keys), np.int64)
    packed_ids[by_rank] = ids_of[: len(keys)]  # keys are sorted ascending: ids in key order
    other_ids = ids_of[len(keys) :]

    cnt = np.zeros(n_ids + 1, np.int64)
    cnt[1:] = all_counts[order[:n_ids]]
    cnt[0] = rows - cnt[1:].sum()  # missing, rarer than min_count, or beyond the cap
    id_dtype = np.int32 if n_ids < 2**31 else np.int64
    present = packed_ids > 0
    (out / VOCAB).mkdir(exist_ok=True)
    (out / COUNTS).mkdir(exist_ok=True)
    _save_npy(out / VOCAB / f"{c}.keys.npy", keys[present])
    _save_npy(out / VOCAB / f"{c}.ids.npy", packed_ids[present].astype(id_dtype))
    if okeys:
        sel = other_ids > 0
        _write_parquet(
            out / VOCAB / f"{c}.other.parquet",
            pa.table({"value": pa.array([v for v, s in zip(okeys, sel) if s], pa.string()), "id": pa.array(other_ids[sel])}),
            1 << 20,
        )
    _save_npy(out / COUNTS / f"{c}.npy", cnt)
    return n_ids + 1


def _hash_counts(out: str, ci: int, count_files: list[str], max_rows: int) -> int:
    """Hash mode: sum the per-chunk id counts of one column into counts/<C>.npy (length max_rows)."""
    out, c = Path(out), SPARSE[ci]
    cnt = np.zeros(max_rows, np.float64)  # bincount weights are float64: exact below 2**53 rows
    for f in count_files:
        with pa.OSFile(str(out / f)) as src:  # read into memory: safe to use after close
            b = pa.ipc.open_file(src).get_batch(ci)
            cnt += np.bincount(b.column(0).to_numpy().astype(np.int64), weights=b.column(2).to_numpy(), minlength=max_rows)
    (out / COUNTS).mkdir(exist_ok=True)
    _save_npy(out / COUNTS / f"{c}.npy", cnt.astype(np.int64))
    return max_rows


# ---------------------------------------------------------------------------------------------
# Splits


def _day_of(path: str, position: int) -> int:
    m = re.search(r"day_(\d+)", Path(path).name)
    return int(m.group(1)) if m else position


def plan_splits(s: Settings, file_rows: list[int]) -> tuple[str, list[list[tuple[str, int, int]]]]:
    """Per input file: [(split, first row, end row)] in file order. Kaggle: the reference DLRM
    split (7 equal consecutive parts: 6 train, the 7th halved, first half test, second half val).
    Days: every file is a day; held-out days are halved the same way."""
    kind = s.split
    if kind == "auto":
        kind = "kaggle" if len(s.inputs) == 1 and not (s.val_days or s.test_days or s.train_days) else "days"
    if kind == "none":
        return kind, [[("train", 0, n)] for n in file_rows]
    if kind == "kaggle":
        total = sum(file_rows)
        per, extra = divmod(total, 7)
        sizes = [per + (1 if i < extra else 0) for i in range(7)]
        b6 = sum(sizes[:6])
        test_end = b6 + math.ceil(sizes[6] / 2)  # np.array_split puts the extra row first
        ranges = [("train", 0, b6), ("test", b6, test_end), ("val", test_end, total)]
        plan, start = [], 0
        for n in file_rows:  # intersect the global ranges with each file's rows
            plan.append([(sp, max(lo, start) - start, min(hi, start + n) - start) for sp, lo, hi in ranges if max(lo, start) < min(hi, start + n)])
            start += n
        return kind, plan
    if kind != "days":
        raise PreprocessError(f"--split must be auto, kaggle, days or none, got {kind!r}")
    days = [_day_of(p, i) for i, p in enumerate(s.inputs)]
    if len(set(days)) != len(days):
        raise PreprocessError(f"two inputs are the same day: {days}")
    val = set(s.val_days if s.val_days is not None else ([] if s.test_days else [max(days)]))
    test = set(s.test_days if s.test_days is not None else ([] if s.val_days else [max(days)]))
    train = set(s.train_days) if s.train_days is not None else set(days) - val - test
    plan = []
    for p, d, n in zip(s.inputs, days, file_rows):
        parts = [sp for sp, ds in (("train", train), ("test", test), ("val", val)) if d in ds]
        if not parts:
            raise PreprocessError(f"{p} (day {d}) is in no split: name it in --train-days/--val-days/--test-days")
        if parts == ["test", "val"]:
            half = math.ceil(n / 2)
            plan.append([("test", 0, half), ("val", half, n)])
        elif len(parts) == 1:
            plan.append([(parts[0], 0, n)])
        else:
            raise PreprocessError(f"{p} (day {d}) is in several splits {parts}; only val+test halves a day")
    return kind, plan


def _assign_parts(out: Path, records: list[list[dict]], plan, row_group_rows: int):
    """Chunk outputs -> split file lists; a chunk that straddles a boundary is sliced into one file
    per split. Returns (splits, rows per split, sliced originals to delete once meta.json exists)."""
    splits, rows, sliced = {}, Counter(), []
    for recs, ranges in zip(records, plan):
        start = 0
        for rec in recs:
            n = rec["rows"]
            if n == 0:
                continue
            pieces = [(sp, max(lo, start) - start, min(hi, start + n) - start) for sp, lo, hi in ranges if max(lo, start) < min(hi, start + n)]
            part = out / rec["output"]
            if len(pieces) == 1:
                splits.setdefault(pieces[0][0], []).append(rec["output"])
            else:
                # The original is deleted only after meta.json is written, so it is still here
                # even when an earlier finalize was interrupted.
                table = pq.read_table(part)
                for sp, lo, hi in pieces:
                    piece = part.with_name(part.stem + f".{sp}.parquet")
                    _write_parquet(piece, table.slice(lo, hi - lo), row_group_rows)
                    splits.setdefault(sp, []).append(str(piece.relative_to(out)))
                sliced.append(part)
            for sp, lo, hi in pieces:
                rows[sp] += hi - lo
            start += n
    return splits, dict(rows), sliced


# ---------------------------------------------------------------------------------------------
# The whole run


def _fids(inputs: list[str]) -> list[str]:
    stems = [re.sub(r"(\.gz)?$", "", Path(p).name) for p in inputs]
    stems = [re.sub(r"\.(txt|csv|tsv)$", "", x) for x in stems]
    stems = [re.sub(r"[^A-Za-z0-9_.-]", "_", x) for x in stems]
    return stems if len(set(stems)) == len(stems) else [f"{i:03d}_{x}" for i, x in enumerate(stems)]


def _names(path: Path, fmt: str) -> list[str]:
    if fmt == "tsv":
        return ct.COLUMNS
    with ct.open_text(path) as f:
        return ct.csv_header(path, f.readline(1 << 16))


def _prepare_out(out: Path, settings: Settings, overwrite: bool) -> bool:
    """Make `out` ready; returns True when it already holds this exact finished dataset."""
    fingerprint = {"settings": asdict(settings), "input_sizes": [Path(p).stat().st_size for p in settings.inputs]}
    meta_path, work_cfg = out / META_FILE, out / WORK / "settings.json"
    if out.exists() and any(out.iterdir()):
        ours = work_cfg.exists() or (meta_path.exists() and "preprocess" in DatasetMeta.load(out).extra)
        if not ours:
            raise PreprocessError(f"{out}: exists, is not empty and is not a preprocessing output; choose another --out")
        if overwrite:
            for name in (WORK, PARTS, COUNTS, VOCAB):
                shutil.rmtree(out / name, ignore_errors=True)
            meta_path.unlink(missing_ok=True)
        elif meta_path.exists():
            prev = DatasetMeta.load(out).extra.get("preprocess", {}).get("fingerprint")
            if prev == fingerprint:
                return True
            raise PreprocessError(f"{out}: holds a dataset made with other settings or inputs; pass --overwrite or choose another --out")
        elif json.loads(work_cfg.read_text()) != fingerprint:
            raise PreprocessError(f"{out}: holds an unfinished run with other settings or inputs; pass --overwrite to start over")
    _write_json(work_cfg, fingerprint)
    return False


def preprocess(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    fmt: str | None = None,
    mode: str = "vocab",
    min_count: int = 1,
    max_rows: int = 0,
    chunk_bytes: int = 64 << 20,
    row_group_rows: int = 65536,
    staging: bool = True,
    split: str = "auto",
    train_days: list[int] | None = None,
    val_days: list[int] | None = None,
    test_days: list[int] | None = None,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    keep_work: bool = False,
    progress: bool = True,
) -> dict:
    """Preprocess Criteo text files into a parquet dataset directory; returns the summary that is
    also stored in meta.json extra["preprocess"]."""
    t_start = time.perf_counter()
    paths = [Path(p).resolve() for p in inputs]
    if not paths:
        raise PreprocessError("no input files given")
    if all(re.search(r"day_\d+", p.name) for p in paths):  # day_10 after day_2, whatever the shell did
        paths.sort(key=lambda p: _day_of(p.name, 0))
    for p in paths:
        ct.check_input(p)
    if mode not in ("vocab", "hash"):
        raise PreprocessError(f"--mode must be vocab or hash, got {mode!r}")
    if mode == "hash" and max_rows < 2:
        raise PreprocessError("--mode hash needs --max-rows N (N >= 2: table rows, id 0 = missing)")
    if fmt is not None and fmt not in ct.FORMATS:
        raise PreprocessError(f"--format must be one of {ct.FORMATS}, got {fmt!r}")
    if min_count < 1 or chunk_bytes < 1 or row_group_rows < 1:
        raise PreprocessError("--min-count, --chunk-mb and --row-group-rows must be positive")
    formats = [fmt or ct.detect_format(p) for p in paths]
    settings = Settings(
        inputs=[str(p) for p in paths], formats=formats, mode=mode, min_count=min_count, max_rows=max_rows,
        chunk_bytes=chunk_bytes, row_group_rows=row_group_rows, staging=staging and mode == "vocab", split=split,
        train_days=train_days, val_days=val_days, test_days=test_days,
    )  # fmt: skip
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if _prepare_out(out, settings, overwrite):
        meta = DatasetMeta.load(out)
        # A crash right after meta.json was written can leave sliced originals: not referenced.
        referenced = {f for files in meta.splits.values() for f in files}
        for part in (out / PARTS).glob("*.parquet"):
            if str(part.relative_to(out)) not in referenced:
                part.unlink()
        summary = meta.extra["preprocess"]
        if not keep_work:  # a crash between meta.json and this cleanup leaves .work behind
            shutil.rmtree(out / WORK, ignore_errors=True)
        if progress:
            print(f"{out}: already complete (same inputs and settings); nothing to do", file=sys.stderr)
        return summary
    fids = _fids(settings.inputs)
    names = [_names(p, f) for p, f in zip(paths, formats)]
    plan_splits(settings, [0] * len(paths))  # fail on a bad split before hours of work
    pool = Workers(workers)
    try:
        summary = _run(out, settings, fids, names, pool, strict, progress, t_start)
    finally:
        pool.close()
    if not keep_work:
        shutil.rmtree(out / WORK, ignore_errors=True)
    if progress:
        print(format_summary(summary), file=sys.stderr)
    return summary


def _run(out: Path, settings: Settings, fids, names, workers: Workers, strict: bool, progress: bool, t_start: float) -> dict:
    paths = [Path(p) for p in settings.inputs]
    mode, min_count, max_rows = settings.mode, settings.min_count, settings.max_rows
    seconds, reused, done = {}, {}, {}

    if mode == "vocab":
        count = Job(str(out), "count", settings, fids, names, strict)
        with _phase(seconds, "count"):
            reused["count"], done["count"] = _run_pass(count, workers, progress, "pass 1/2 count")
        count_recs = _all_records(count)
        _check_not_empty(paths, count_recs)
        vocab_done = out / WORK / "vocab.json"
        with _phase(seconds, "vocab"):
            if not vocab_done.exists():
                files = [r["output"] for recs in count_recs for r in recs]
                rows = sum(r["rows"] for recs in count_recs for r in recs)
                args = [(str(out), ci, files, rows, min_count, max_rows) for ci in range(len(SPARSE))]
                sizes = workers.map(_merge_column, args)
                _write_json(vocab_done, dict(zip(SPARSE, sizes)))
        cardinalities = json.loads(vocab_done.read_text())

    encode = Job(str(out), "encode", settings, fids, names, strict)
    with _phase(seconds, "encode"):
        reused["encode"], done["encode"] = _run_pass(encode, workers, progress, "pass 2/2 encode" if mode == "vocab" else "encode (hash)")
    records = _all_records(encode)
    _check_not_empty(paths, records)
    if mode == "hash":
        with _phase(seconds, "counts"):
            files = [str(Path(WORK) / "encode" / fids[fi] / f"{k:06d}.arrow") for fi, recs in enumerate(records) for k in range(len(recs))]
            sizes = workers.map(_hash_counts, [(str(out), ci, files, max_rows) for ci in range(len(SPARSE))])
        cardinalities = dict(zip(SPARSE, sizes))

    # Splits, summary, meta.json (written last: its presence means the dataset is complete).
    log.info("start finalize")
    t = time.perf_counter()
    file_rows = [sum(r["rows"] for r in recs) for recs in records]
    split_kind, plan = plan_splits(settings, file_rows)
    splits, split_rows, sliced = _assign_parts(out, records, plan, settings.row_group_rows)
    seconds["finalize"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    summary = _summary(settings, records, split_kind, split_rows, cardinalities, seconds, reused)
    # Rates of this run's work only (a resumed run reads fewer rows than the dataset has).
    summary["rows_per_s"] = {k: round(n / max(seconds[k], 1e-9)) for k, n in done.items()}
    summary["fingerprint"] = json.loads((out / WORK / "settings.json").read_text())
    meta = DatasetMeta(
        cardinalities=cardinalities,
        splits=splits,
        rows=split_rows,
        multi_hot={},
        extra={"preprocess": summary, "counts_dir": COUNTS, "vocab_dir": VOCAB if mode == "vocab" else None},
    )
    meta.save(out)
    for part in sliced:
        part.unlink(missing_ok=True)
    for tmp in (out / PARTS).glob(".*.tmp"):  # left by a crash mid-write; never referenced
        tmp.unlink()
    log.info("end finalize (%.1f s)", seconds["finalize"])
    return summary


@contextmanager
def _phase(seconds: dict, name: str):
    """Time a phase into seconds[name]; log its start and end (the benchmark listens)."""
    log.info("start %s", name)
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - t
        log.info("end %s (%.1f s)", name, seconds[name])


def _check_not_empty(paths: list[Path], records: list[list[dict]]) -> None:
    for p, recs in zip(paths, records):
        if sum(r["rows_in"] for r in recs) == 0:
            raise ct.InputError(f"{p}: empty input (no data lines)")


def _summary(s: Settings, records, split_kind, split_rows, cardinalities, seconds, reused) -> dict:
    skipped, bad, padded = Counter(), {}, 0
    for fi, recs in enumerate(records):
        line0 = 0
        for rec in recs:
            skipped.update(rec["skipped"])
            padded += rec["padded"]
            for reason, lines in rec["bad_lines"].items():
                kept = bad.setdefault(reason, [])
                kept += [f"{Path(s.inputs[fi]).name}:{line0 + n}" for n in lines][: max(0, ct.MAX_BAD_LINES - len(kept))]
            line0 += rec["lines"]
    rows_in = sum(r["rows_in"] for recs in records for r in recs)
    rows_written = sum(split_rows.values())
    if rows_written + sum(skipped.values()) != rows_in:  # nothing may vanish without a reason
        raise RuntimeError(f"rows do not add up: {rows_in} read, {rows_written} written, {dict(skipped)} skipped")
    return {
        "inputs": s.inputs,
        "formats": s.formats,
        "mode": s.mode,
        "min_count": s.min_count,
        "max_rows": s.max_rows,
        "split": split_kind,
        "rows_in": rows_in,
        "rows_written": split_rows,
        "rows_skipped": dict(skipped),
        "first_bad_lines": bad,
        "rows_padded": padded,
        "vocabulary": cardinalities,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "chunks_reused": reused,
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"rows in: {summary['rows_in']:,}",
        "rows written: " + ", ".join(f"{k} {v:,}" for k, v in summary["rows_written"].items()),
        "rows skipped: " + (", ".join(f"{k} {v:,}" for k, v in summary["rows_skipped"].items()) or "none"),
    ]
    for reason, where in summary["first_bad_lines"].items():
        lines.append(f"  {reason}: first at {', '.join(where)}")
    if summary["rows_padded"]:
        lines.append(f"rows padded (stripped trailing fields): {summary['rows_padded']:,}")
    lines.append("vocabulary: " + " ".join(f"{k}={v}" for k, v in summary["vocabulary"].items()))
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    lines.append("rows/s: " + ", ".join(f"{k} {v:,}" for k, v in summary["rows_per_s"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _days(text: str) -> list[int]:
    """'23' or '0-5,7' -> [23] or [0, 1, 2, 3, 4, 5, 7]."""
    days = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        days += list(range(int(lo), int(hi or lo) + 1))
    return days


DATASET_SPLITS = {"kaggle": "kaggle", "terabyte": "days"}  # --dataset, as in the reference DLRM


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dlrm.data.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="Criteo text files: train.txt, day_0 .. day_23, plain or .gz")
    p.add_argument("--out", required=True, help="dataset directory (parquet parts, counts/, meta.json)")
    p.add_argument("--format", choices=ct.FORMATS, help="tsv (no header) or csv (Kaggle Id,Label header); default: detected")
    p.add_argument("--mode", choices=["vocab", "hash"], default="vocab", help="vocab: ids by frequency (2 passes); hash: 1 pass")
    p.add_argument("--min-count", type=int, default=1, help="vocab: values seen fewer times get id 0")
    p.add_argument("--max-rows", type=int, default=0, help="table rows cap: vocab keeps the N-1 most frequent; hash: N buckets")
    p.add_argument("--split", choices=["auto", "kaggle", "days", "none"], default="auto",
                   help="auto: kaggle for one input file, days for several")  # fmt: skip
    p.add_argument("--dataset", choices=list(DATASET_SPLITS),
                   help="name the dataset instead of --split: kaggle = --split kaggle, terabyte = --split days")  # fmt: skip
    p.add_argument("--train-days", type=_days, help="days (from day_N names, else input positions) for train, e.g. 0-22")
    p.add_argument("--val-days", type=_days, help="days for val (default: the last day; halved with test when both name it)")
    p.add_argument("--test-days", type=_days, help="days for test (default: the last day, first half)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="worker processes (default: CPU count)")
    p.add_argument("--chunk-mb", type=float, default=64, help="MB of text per chunk (unit of work and of restart)")
    p.add_argument("--row-group-rows", type=int, default=65536, help="parquet row group size")
    p.add_argument("--no-staging", action="store_true",
                   help="vocab mode: parse the text again in pass 2 instead of keeping pass 1's rows "
                   "(zstd, about 30%% of the text size) on disk until they are encoded")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output or unfinished run in --out")
    p.add_argument("--keep-work", action="store_true", help="keep .work/ (manifest, per-chunk counts) after finishing")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dataset:
        if a.split not in ("auto", DATASET_SPLITS[a.dataset]):
            print(f"preprocess: error: --dataset {a.dataset} splits as {DATASET_SPLITS[a.dataset]}, not --split {a.split}", file=sys.stderr)
            return 2
        a.split = DATASET_SPLITS[a.dataset]
    try:
        preprocess(
            a.inputs, a.out, fmt=a.format, mode=a.mode, min_count=a.min_count, max_rows=a.max_rows,
            chunk_bytes=int(a.chunk_mb * (1 << 20)), row_group_rows=a.row_group_rows, staging=not a.no_staging, split=a.split,
            train_days=a.train_days, val_days=a.val_days, test_days=a.test_days, workers=a.workers,
            strict=a.strict, overwrite=a.overwrite, keep_work=a.keep_work, progress=not a.quiet,
        )  # fmt: skip
    except (ct.InputError, PreprocessError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One chunk of work (runs in a worker process): parse it, then write what the pass makes of it
(count: per-chunk counts and staged rows; encode: the parquet part), then its record."""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dlrm.data import criteo_text as ct
from dlrm.data.preprocess import workers
from dlrm.data.preprocess.count import count_batches
from dlrm.data.preprocess.encode import HashEncoder, VocabEncoder
from dlrm.data.preprocess.files import write_counts, write_ipc, write_json, write_parquet
from dlrm.data.preprocess.keys import column_keys
from dlrm.data.preprocess.settings import (
    COUNT_SCHEMA, OUT_SCHEMA, PARTS, WORK, PreprocessError, Settings, record_path, stage_path, stream_done_path,
)  # fmt: skip
from dlrm.data.schema import DENSE, LABEL, SPARSE


@dataclass
class Job:
    """What a worker needs to process chunks of one pass; small and picklable."""

    out: str
    pass_name: str  # count | encode
    settings: Settings
    fids: list[str]  # per input file: the name its chunk outputs carry
    names: list[list[str]]  # per input file: its column names (csv: from the header)
    strict: bool = False


_ENCODER = None  # per worker process: (key, encoder)


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
    data = ct.to_lf(data, s.eols[fi])
    first_line = 1
    if s.headers[fi] and k == 0:  # the header belongs to chunk 0 and is not a row
        _, _, data = data.partition(b"\n")
        first_line = 2

    def file_line(line: int) -> int:
        nonlocal line0
        if line0 < 0:  # lines starting before byte k*B: the first, plus one per line end before k*B-1
            line0 = _newlines(path, k * s.chunk_bytes - 1, ct.EOLS[s.eols[fi]]) + 1 if k else 0
        return line0 + line

    try:
        parsed = ct.parse_chunk(data, fmt, job.names[fi], first_line=first_line)
    except pa.ArrowInvalid as e:  # not expected (parse_chunk screens what pyarrow rejects): still name the place
        raise ct.InputError(f"{path}:{file_line(first_line)}: chunk {k} cannot be parsed ({e})") from e
    table = parsed.table
    if len(table) + sum(parsed.skipped.values()) != parsed.lines:
        raise RuntimeError(f"{path} chunk {k}: rows do not add up ({len(table)} kept, {parsed.skipped})")
    if job.strict and parsed.skipped:
        line, reason = min((n, r) for r, lines in parsed.bad_lines.items() for n in lines)  # the first
        raise ct.InputError(f"{path}:{file_line(line)}: {reason} (--strict: no row may be skipped)")
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


def _encode_staged(job: Job, fi: int, k: int) -> dict:
    """Pass 2 from pass 1's parsed rows: no second parse of the text."""
    out, fid = Path(job.out), job.fids[fi]
    stage = stage_path(out, fid, k)
    record = json.loads(record_path(out, "count", fid, k).read_text())
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
        write_counts(work / f"{k:06d}.arrow", count_batches(table))
        record["output"] = str((work / f"{k:06d}.arrow").relative_to(out))
        if s.staging:
            stage = stage_path(out, fid, k)
            stage.parent.mkdir(parents=True, exist_ok=True)
            write_ipc(stage, table, "zstd")
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
            write_parquet(part, pa.table(cols, schema=OUT_SCHEMA), s.row_group_rows)
            record["output"] = str(part.relative_to(out))
        if s.mode == "hash":
            write_counts(work / f"{k:06d}.arrow", id_counts)
    write_json(record_path(out, job.pass_name, fid, k), record)
    if workers.PROGRESS is not None:
        workers.PROGRESS.put((record["bytes"], record["rows_in"]))
    return record


def _newlines(path: Path, offset: int, eol: bytes) -> int:
    """Line ends in the first `offset` bytes (only for an error message: where is the bad line)."""
    n = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 16 << 20))
            if not block:
                break
            n += block.count(eol)
            offset -= len(block)
    return n


def run_task(job: Job, task: tuple) -> tuple[list[dict], int]:
    """('plain', fi, k): one chunk of an uncompressed file. ('stream', fi): every chunk of a gzip
    file in order (it cannot seek), skipping the chunks already recorded. ('staged', fi, k): one
    chunk of pass 2 from pass 1's staged rows (any input, gzip too, runs in parallel).
    Returns (the chunks' records, rows read by this call: not those of chunks already recorded)."""
    s, out = job.settings, Path(job.out)
    fi = task[1]
    path = Path(s.inputs[fi])
    if task[0] == "staged":
        rec = _encode_staged(job, fi, task[2])
        return [rec], rec["rows_in"]
    if task[0] == "plain":
        k = task[2]
        data = ct.read_plain_chunk(path, k, s.chunk_bytes, ct.EOLS[s.eols[fi]])
        rec = _process_chunk(job, fi, k, data, -1, len(data))
        return [rec], rec["rows_in"]
    fid, records, line0, fresh = job.fids[fi], [], 0, 0
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
        chunks, pos = ct.iter_stream_chunks(f, s.chunk_bytes, ct.EOLS[s.eols[fi]]), 0
        for k in itertools.count():
            try:
                data = next(chunks)
            except StopIteration:
                break
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise ct.InputError(f"{path}: truncated or corrupt gzip after {k} chunks ({e})") from e
            in_bytes, pos = raw.tell() - pos, raw.tell()  # compressed bytes: what the bar counts
            done = record_path(out, job.pass_name, fid, k)
            if done.exists():
                rec = json.loads(done.read_text())
                if workers.PROGRESS is not None:
                    workers.PROGRESS.put((in_bytes, rec["rows_in"]))
            else:
                rec = _process_chunk(job, fi, k, data, line0, in_bytes)
                fresh += rec["rows_in"]
            line0 += rec["lines"]
            records.append(rec)
    write_json(stream_done_path(out, job.pass_name, fid), {"chunks": len(records)})
    return records, fresh


"""A pass over all inputs: which chunks are still to do, run them, read back their records."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from dlrm.data import criteo_text as ct
from dlrm.data.preprocess.chunks import Job, run_task
from dlrm.data.preprocess.settings import PreprocessError, Settings, record_path, stream_done_path
from dlrm.data.preprocess.workers import Workers

def _plain_chunks(path: Path, chunk_bytes: int) -> int:
    return max(1, math.ceil(path.stat().st_size / chunk_bytes))


def run_pass(job: Job, workers: Workers, progress: bool, desc: str) -> tuple[int, int]:
    """Run every unfinished chunk of a pass; returns (chunks already done, rows read this run)."""
    s, out = job.settings, Path(job.out)
    tasks, done_bytes, done_rows, reused = [], 0, 0, 0
    staged = job.pass_name == "encode" and s.mode == "vocab" and s.staging
    for fi, p in enumerate(s.inputs):
        path, fid = Path(p), job.fids[fi]
        if staged:  # one task per chunk of pass 1
            for k, r in enumerate(file_records(out, "count", fid, _n_chunks(out, s, fi, fid))):
                if record_path(out, job.pass_name, fid, k).exists():
                    reused += 1
                    done_bytes += r["bytes"]
                    done_rows += r["rows_in"]
                else:
                    tasks.append(("staged", fi, k))
            continue
        if ct.is_gzip(path):
            if stream_done_path(out, job.pass_name, fid).exists():
                recs = file_records(out, job.pass_name, fid, None)
                reused += len(recs)
                done_bytes += path.stat().st_size
                done_rows += sum(r["rows_in"] for r in recs)
            else:
                tasks.append(("stream", fi))  # reports its finished chunks as it passes them
            continue
        for k in range(_plain_chunks(path, s.chunk_bytes)):
            rec = record_path(out, job.pass_name, fid, k)
            if rec.exists():
                r = json.loads(rec.read_text())
                reused += 1
                done_bytes += r["bytes"]
                done_rows += r["rows_in"]
            else:
                tasks.append(("plain", fi, k))
    total = sum(Path(p).stat().st_size for p in s.inputs)
    bar = tqdm(total=total, initial=done_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()

    def advance(nbytes, nrows):
        nonlocal seen
        seen += nrows
        bar.update(nbytes)
        bar.set_postfix_str(f"{done_rows + seen:,} rows, {seen / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s", refresh=False)

    try:
        results = workers.map(run_task, [(job, t) for t in tasks], lambda msg: advance(*msg))
    finally:
        bar.close()
    # Rows from the tasks' results, not from the progress messages: a worker's last messages can
    # still be in flight when its result arrives (that made the summary's rows/s read 0).
    return reused, sum(fresh for _, fresh in results)


def file_records(out: Path, pass_name: str, fid: str, n_chunks: int | None) -> list[dict]:
    """A file's chunk records in order (n_chunks None: a stream file, count from its done.json)."""
    if n_chunks is None:
        n_chunks = json.loads(stream_done_path(out, pass_name, fid).read_text())["chunks"]
    recs = []
    for k in range(n_chunks):
        p = record_path(out, pass_name, fid, k)
        if not p.exists():
            raise PreprocessError(f"{p}: missing chunk record after the pass finished (work dir edited?)")
        recs.append(json.loads(p.read_text()))
    return recs


def _n_chunks(out: Path, s: Settings, fi: int, fid: str) -> int:
    path = Path(s.inputs[fi])
    if not ct.is_gzip(path):
        return _plain_chunks(path, s.chunk_bytes)
    first_pass = "count" if s.mode == "vocab" else "encode"  # the pass that streamed the file
    return json.loads(stream_done_path(out, first_pass, fid).read_text())["chunks"]


def all_records(job: Job) -> list[list[dict]]:
    s, out = job.settings, Path(job.out)
    return [file_records(out, job.pass_name, fid, _n_chunks(out, s, fi, fid)) for fi, fid in enumerate(job.fids)]


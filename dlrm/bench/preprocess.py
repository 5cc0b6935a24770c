"""Preprocessing throughput and memory on Criteo-format text rendered from synthetic rows.

The real datasets are not needed: rows come from dlrm.data.synthetic (Zipf ids over the Kaggle
vocabulary sizes, Criteo-like counts), rendered as Kaggle train.txt text (8-hex-digit
categoricals) and cached under data/bench-preprocess/. Then `python -m dlrm.data.preprocess`'s
function runs in this process while a thread samples the process tree (this process + workers)
for resident memory and CPU time, attributed to the phases reported in the run's summary.

    python scripts/bench_preprocess.py                               # 2M rows, 2 workers
    python scripts/bench_preprocess.py --rows 1000000 2000000 4000000 # memory trend over input size
    python scripts/bench_preprocess.py --mode hash --max-rows 40000000
    python scripts/bench_preprocess.py render --rows 1000000 --out data/synthetic_train.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from dlrm.data import preprocess as pp
from dlrm.data.criteo_text import CriteoTextWriter
from dlrm.data.schema import SPARSE

ROOT = Path(__file__).resolve().parents[2] / "data" / "bench-preprocess"
KAGGLE_ROWS, TERABYTE_ROWS = 45_840_617, 4_373_472_329  # rows of the real train.txt / day_0..23


def synthetic_blocks(rows: int, seed: int = 0, max_cardinality: int = 0, block: int = 1 << 18):
    """(label, dense, sparse) blocks of Criteo-shaped rows. Categorical ids come from the synthetic
    generator's Zipf sampler; each (feature, id) is scrambled by an odd multiplier mod 2**32 (a
    bijection), so hex values are not in frequency order, as in the real logs."""
    # Imported here, not at the top: synthetic imports torch, and spawned preprocessing workers
    # re-import this module (the script's __main__); they should not pay for torch.
    from dlrm.data.synthetic import DENSE_LOG_MEAN, DENSE_MISSING, SyntheticSpec, zipf_ids

    spec = SyntheticSpec(rows=rows, max_cardinality=max_cardinality, seed=seed)
    cards = spec.cardinalities()
    for b, start in enumerate(range(0, rows, block)):
        n = min(block, rows - start)
        rng = np.random.default_rng([seed, b])
        dense = np.floor(np.exp(rng.normal(DENSE_LOG_MEAN, 1.2, size=(n, 13)))) - 1.0
        dense[:, 1] -= (rng.random(n) < 0.05) * rng.integers(1, 4, n)  # a few negatives, like I2
        dense[rng.random((n, 13)) < DENSE_MISSING] = np.nan
        sparse = np.empty((n, len(SPARSE)), np.int64)
        for f, card in enumerate(cards):
            ids = zipf_ids(rng, card, n, spec.zipf).astype(np.uint64)
            sparse[:, f] = ((ids * np.uint64(0x9E3779B1) + np.uint64(f * 0x85EBCA6B)) % np.uint64(1 << 32)).astype(np.int64)
        label = (rng.random(n) < spec.click_rate).astype(np.int8)
        yield label, dense, sparse


def render(path: Path, rows: int, seed: int = 0, fmt: str = "tsv", max_cardinality: int = 0) -> Path:
    """Synthetic rows as Criteo text at `path` (.gz = gzip); reused when it already exists."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with CriteoTextWriter(path, fmt=fmt) as w:
        for label, dense, sparse in synthetic_blocks(rows, seed, max_cardinality):
            w.write(label, dense, sparse)
    return path


class TreeSampler(threading.Thread):
    """Samples resident memory of this process and of its children (the workers), and the CPU
    seconds of all of them."""

    def __init__(self, period: float = 0.1):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()
        self.me = psutil.Process()
        self.cpu = {}  # pid -> last CPU seconds seen (workers exit before the run ends)

    def run(self) -> None:
        while not self.stop.is_set():
            main_rss, workers_rss, largest = 0, 0, 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss, t = p.memory_info().rss, p.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[p.pid] = t.user + t.system
                if p is self.me:
                    main_rss = rss
                else:
                    workers_rss += rss
                    largest = max(largest, rss)
            self.samples.append((time.perf_counter(), main_rss, workers_rss, largest, sum(self.cpu.values())))
            self.stop.wait(self.period)


class PhaseLog(logging.Handler):
    """Records when preprocessing logs 'start <phase>' / 'end <phase> (...)'."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.events = []

    def emit(self, record: logging.LogRecord) -> None:
        kind, _, rest = record.getMessage().partition(" ")
        if kind in ("start", "end"):
            self.events.append((kind, rest.split(" ")[0], time.perf_counter()))


def measure(text: Path, out: Path, workers: int, **kw) -> dict:
    """Run preprocessing on `text` into a fresh `out`: wall time, CPU seconds and peak resident
    memory per phase (phase boundaries from the run's own log)."""
    shutil.rmtree(out, ignore_errors=True)
    phase_log, logger = PhaseLog(), logging.getLogger(pp.__name__)
    logger.addHandler(phase_log)
    logger.setLevel(logging.INFO)
    sampler = TreeSampler()
    sampler.start()
    try:
        summary = pp.preprocess([text], out, workers=workers, progress=False, **kw)
    finally:
        sampler.stop.set()
        sampler.join()
        logger.removeHandler(phase_log)
    starts = {name: t for kind, name, t in phase_log.events if kind == "start"}
    ends = {name: t for kind, name, t in phase_log.events if kind == "end"}
    phases = {}
    for name, t0 in starts.items():
        inside = [s for s in sampler.samples if t0 <= s[0] <= ends[name]]
        inside = inside or [min(sampler.samples, key=lambda s: abs(s[0] - t0))]
        phases[name] = {
            "seconds": round(ends[name] - t0, 2),
            "cpu_seconds": round(inside[-1][4] - inside[0][4], 2),
            "peak_total_rss_mb": round(max(s[1] + s[2] for s in inside) / 2**20),
            "peak_main_rss_mb": round(max(s[1] for s in inside) / 2**20),
            "peak_worker_rss_mb": round(max(s[3] for s in inside) / 2**20),
        }
    vocab_bytes = sum(f.stat().st_size for f in (out / "vocab").glob("*")) if (out / "vocab").exists() else 0
    rows = summary["rows_in"]
    result = {
        "rows": rows,
        "text_mb": round(text.stat().st_size / 2**20),
        "workers": workers,
        **kw,
        "rows_per_s": summary["rows_per_s"],
        "end_to_end_rows_per_s": round(rows / summary["seconds"]["total"]),
        "phases": phases,
        "peak_total_rss_mb": round(max(s[1] + s[2] for s in sampler.samples) / 2**20),
        "vocab_mb": round(vocab_bytes / 2**20),
        "vocabulary_rows": sum(summary["vocabulary"].values()),
        "output_mb": round(sum(f.stat().st_size for f in (out / "parts").glob("*")) / 2**20),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on a shared machine slows this
    }
    result["full_kaggle_minutes"] = round(KAGGLE_ROWS / result["end_to_end_rows_per_s"] / 60, 1)
    result["full_terabyte_hours"] = round(TERABYTE_ROWS / result["end_to_end_rows_per_s"] / 3600, 1)
    return result


def _print(r: dict) -> None:
    rates = ", ".join(f"{k} {v:,} rows/s" for k, v in r["rows_per_s"].items())
    print(f"{r['rows']:,} rows ({r['text_mb']} MB text), {r['workers']} workers: {rates}; end to end {r['end_to_end_rows_per_s']:,} rows/s")
    for name, p in r["phases"].items():
        print(
            f"  {name:9s} {p['seconds']:7.1f} s  cpu {p['cpu_seconds']:7.1f} s  peak RSS: total {p['peak_total_rss_mb']:5d} MB,"
            f" main {p['peak_main_rss_mb']} MB, largest worker {p['peak_worker_rss_mb']} MB"
        )
    print(f"  vocabulary {r['vocabulary_rows']:,} ids ({r['vocab_mb']} MB on disk), output {r['output_mb']} MB, load avg {r['load_avg_1m']}")
    print(f"  at this rate: full Kaggle {r['full_kaggle_minutes']} min, Terabyte {r['full_terabyte_hours']} h")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="run", choices=["run", "render"])
    p.add_argument("--rows", type=int, nargs="+", default=[2_000_000], help="input sizes to measure")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", choices=["vocab", "hash"], default="vocab")
    p.add_argument("--max-rows", type=int, default=0)
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--no-staging", action="store_true")
    p.add_argument("--chunk-mb", type=float, default=64)
    p.add_argument("--gzip", action="store_true", help="gzip the rendered text (one stream: pass 1 on one worker)")
    p.add_argument("--max-cardinality", type=int, default=0, help="cap vocabularies (0 = Kaggle sizes)")
    p.add_argument("--root", type=Path, default=ROOT, help="where text and outputs go")
    p.add_argument("--out", type=Path, help="render: the text file to write")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    a = p.parse_args(argv)
    if a.command == "render":
        if a.out is None:
            p.error("render needs --out FILE")
        print(render(a.out, a.rows[0], max_cardinality=a.max_cardinality))
        return
    for rows in a.rows:
        name = f"synthetic-{rows}-c{a.max_cardinality}.txt" + (".gz" if a.gzip else "")
        t = time.perf_counter()
        text = render(a.root / name, rows, max_cardinality=a.max_cardinality)
        if not a.json:
            print(f"text: {text} ({time.perf_counter() - t:.0f} s to render or find)")
        kw = dict(
            mode=a.mode, max_rows=a.max_rows, min_count=a.min_count, staging=not a.no_staging,
            chunk_bytes=int(a.chunk_mb * (1 << 20)),
        )  # fmt: skip
        # A fresh process per measurement: memory a previous run left allocated is not counted.
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            r = ex.submit(measure, text, a.root / "out", a.workers, **kw).result()
        print(json.dumps(r)) if a.json else _print(r)
    shutil.rmtree(a.root / "out", ignore_errors=True)


if __name__ == "__main__":
    main()

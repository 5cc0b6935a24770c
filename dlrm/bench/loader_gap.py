"""Why the trainer's step is slower inside a run than alone: the same step, the same batches, with
and without a live parquet loader in the process.

Seen 2026-11-30 with one-off scripts (docs/benchmarks.md, "The step inside a run"): 26-27 ms
alone, 44 ms once a `ParquetLoader` had produced a few batches, even with its thread idle on a full
queue; 27 ms again once that loader's generator was closed. This script's own first run, on a
slower moment of the VM, did not show the gap: re-run it on a quiet machine.

    python scripts/bench_loader_gap.py fresh      # no loader
    python scripts/bench_loader_gap.py loader     # a live loader, idle
    python scripts/bench_loader_gap.py closed     # a loader whose epoch generator was closed
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dlrm.bench.steps import build, compose, make_batches
from dlrm.data.loader import Batch, ParquetLoader
from dlrm.data.schema import KAGGLE_CARDINALITIES
from dlrm.trainer import Trainer


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("fresh", "loader", "closed"))
    p.add_argument("--data", type=Path, help="a dataset dir (default: the first data/synthetic-*)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep = []
    if args.mode != "fresh":
        data = args.data or next(d for d in sorted(Path("data").glob("synthetic-*")) if d.is_dir())
        epoch = ParquetLoader(data, "train", 2048, seed=1).epoch(0)
        for _ in range(3):
            next(epoch)
        if args.mode == "closed":
            epoch.close()
        keep.append(epoch)
    cards = list(KAGGLE_CARDINALITIES)
    cfg = compose("full", [])
    model, _ = build("full", cards, cfg)
    trainer = Trainer(cfg, model, None, None, None, torch.device("cpu"))
    batches = [Batch(d, k, y) for d, k, y in make_batches(cards, 2048, args.steps)]
    times = []
    for b in batches:
        t0 = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[5:]) * 1e3
    print(f"{args.mode}: median step {ms:.1f} ms (min {min(times[5:]) * 1e3:.1f}), {args.threads} threads")
    return ms


if __name__ == "__main__":
    main()

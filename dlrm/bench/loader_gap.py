"""Why the trainer's step was slower inside a run than alone: the same step, the same batches, with
and without a live parquet loader in the process.

The cause (found 2026-11-30, dlrm/threads.py): the loader thread's torch ops started a second
OpenMP team, and libgomp then throttles every team's spin-waiting (more OpenMP threads than
cores), so the training step's second thread slept and woke hundreds of times a step. The loader
thread now limits its own OpenMP threads (`dlrm.threads.limit_this_thread`); `unlimited` runs the
loader without that limit, to show the effect. Voluntary context switches per step (from
`getrusage`) are printed beside the times: they show the throttling even when a busy machine
blurs the times.

    python scripts/bench_loader_gap.py fresh      # no loader
    python scripts/bench_loader_gap.py loader     # a live loader, idle (its thread limited: main)
    python scripts/bench_loader_gap.py unlimited  # the same loader without the limit (before)
    python scripts/bench_loader_gap.py closed     # a loader whose epoch generator was closed
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

import dlrm.data.loader as loader_mod
from dlrm.bench.steps import build, compose, make_batches
from dlrm.data.loader import Batch, ParquetLoader
from dlrm.data.schema import KAGGLE_CARDINALITIES
from dlrm.trainer import Trainer


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("fresh", "loader", "unlimited", "closed"))
    p.add_argument("--data", type=Path, help="a dataset dir (default: the first data/synthetic-*)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep = []
    if args.mode == "unlimited":
        loader_mod.limit_this_thread = lambda threads=1: False
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
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for b in batches:
        t0 = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - t0)
    switches = (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches) / len(batches)
    ms = statistics.median(times[5:]) * 1e3
    print(f"{args.mode}: median step {ms:.1f} ms (min {min(times[5:]) * 1e3:.1f}), {args.threads} threads, "
          f"{switches:.0f} voluntary context switches per step")
    return ms


if __name__ == "__main__":
    main()

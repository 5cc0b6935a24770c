#!/usr/bin/env python
"""Step time of several backends relative to `full`, robust to a shared, loaded machine.

scripts/bench.py times one backend after another, so load that changes between them (other jobs
on the same cores) lands in the comparison. This builds every backend once, then times them in
rounds, each round every backend for a few steps in turn, and reports per backend the median step,
the median over rounds of its ratio to `full` in the same round, and its fastest step (the least
disturbed one: on a loaded machine the closest to its intrinsic cost) against full's fastest.

    python scripts/bench_interleaved.py --backends full hybrid mde fp16 --caps 0
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dlrm.bench.steps import build, compose, make_batches, time_steps
from dlrm.data.schema import KAGGLE_CARDINALITIES


def emb_steps(model, opts, batches, warmup: int) -> list[float]:
    """Seconds per step of the embedding backend alone (forward, backward, its optimizers)."""
    emb, own = model.sparse_arch, model.sparse_arch.optimizers()
    times = []
    for i, (_, kjt, _) in enumerate(batches):
        t0 = time.perf_counter()
        for o in own:
            o.zero_grad(set_to_none=True)
        emb(kjt).values().sum().backward()
        for o in own:
            o.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["full", "hybrid", "mde", "fp16"])
    p.add_argument("--cap", type=int, default=0, help="table row cap; 0 = Kaggle sizes")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per backend per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--emb-only", action="store_true", help="time only the embedding backend: forward, "
                   "backward of the pooled sum (fused updates included), its own optimizers")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every backend")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cards = [min(c, args.cap) if args.cap else c for c in KAGGLE_CARDINALITIES]
    batches = make_batches(cards, args.batch_size, args.steps + 2)
    if "full" not in args.backends:
        args.backends.insert(0, "full")
    models = {}
    for b in args.backends:
        models[b] = build(b, cards, compose(b, ["trainer.precision=fp32", *args.overrides]))
        time_steps(*models[b], batches[:3], warmup=3)  # first-call costs
    step = emb_steps if args.emb_only else time_steps
    times = {b: [] for b in args.backends}
    ratios = {b: [] for b in args.backends}
    fastest = {b: float("inf") for b in args.backends}  # least disturbed step: the intrinsic cost
    for _ in range(args.rounds):
        median = {}
        for b in args.backends:
            t = step(*models[b], batches, warmup=2)
            median[b], fastest[b] = statistics.median(t), min(fastest[b], *t)
        for b in args.backends:
            times[b].append(median[b])
            ratios[b].append(median[b] / median["full"])
    for b in args.backends:
        mb = models[b][0].sparse_arch.embedding_bytes() / 2**20
        print(
            f"{b:>8}  step {statistics.median(times[b]) * 1e3:7.1f} ms  fastest {fastest[b] * 1e3:7.1f} ms "
            f"({fastest[b] / fastest['full']:.2f}x)  "
            f"vs full {statistics.median(ratios[b]):.2f}x (rounds {min(ratios[b]):.2f}-{max(ratios[b]):.2f})  "
            f"emb {mb:8.1f} MiB"
        )


if __name__ == "__main__":
    main()

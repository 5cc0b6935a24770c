"""Loader throughput: rows/s of ParquetLoader over a dataset, with nothing else running, and its
CPU time per batch (all threads): on 2 cores a training step's OpenMP threads wait out every
millisecond the loader takes from either core, so this, not rows/s, is what a run pays.

    python scripts/bench_loader.py                        # the default synthetic dataset
    python scripts/bench_loader.py --workers 2               # two loader processes
    python scripts/bench_loader.py --path DIR --split train --batch-size 2048
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dlrm.data.loader import ParquetLoader
from dlrm.data.synthetic import SyntheticSpec, ensure_dataset


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", type=Path, help="dataset dir (default: the default synthetic dataset)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2, help="the first is a warm-up (imports, page cache)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="loader processes (0 = one thread)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.path or ensure_dataset(SyntheticSpec(), Path("data"))
    loader = ParquetLoader(path, args.split, args.batch_size, seed=0, workers=args.workers)
    rates, cpu_ms = [], []
    for epoch in range(args.epochs):
        t0, c0, rows, batches = time.perf_counter(), time.process_time(), 0, 0
        for batch in loader.epoch(epoch):
            rows += len(batch)
            batches += 1
        rates.append(rows / (time.perf_counter() - t0))
        cpu_ms.append((time.process_time() - c0) * 1e3 / batches)
    result = {
        "path": str(path),
        "rows": rows,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "rows_per_s": round(max(rates[1:] or rates)),
        "cpu_ms_per_batch": round(min(cpu_ms[1:] or cpu_ms), 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""The tables alone, lookup + backward + fused update: our kernels (C and PyTorch ops) against fbgemm's TBE.

Kaggle-size tables (26 tables, 33.8M rows, dim 16), Zipf batches of one id per feature, the three
kernels (fbgemm, ours in PyTorch ops, ours in C) built by `fused_tables` (the same init) and
stepped on the same batches, interleaved in A B C C B A rounds so a drifting machine hits all
alike; prints each one's median and minimum ms and the ratios of the medians to the C kernel's.

    python scripts/bench_tables.py                          # fp32 rows, row-wise Adagrad, 2 threads
    python scripts/bench_tables.py --precision fp16 --optimizer sgd
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from omegaconf import OmegaConf

from dlrm.bench.common import time_each, zipf_kjt
from dlrm.data.schema import KAGGLE_CARDINALITIES
from dlrm.embeddings import TableSpec
from dlrm.embeddings.tables import fused_tables

KERNELS = ("fbgemm", "torch", "native")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=10, help="batches per kernel per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--optimizer", choices=("rowwise_adagrad", "sgd", "adagrad"), default="rowwise_adagrad")
    p.add_argument("--max-rows", type=int, default=None, help="cap every table's rows (a quick run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cards = [min(rows, args.max_rows or rows) for rows in KAGGLE_CARDINALITIES]
    tables = [TableSpec(f"t_C{i + 1}", rows, args.dim, (f"C{i + 1}",)) for i, rows in enumerate(cards)]
    optim = {"name": args.optimizer, "lr": 0.01, "eps": 1e-8}
    kernels = {
        k: fused_tables(tables, OmegaConf.create({**optim, "kernel": k}), "sum", torch.device("cpu"), args.precision)
        for k in KERNELS
    }
    rng = np.random.default_rng(0)
    batches = [zipf_kjt(tables, args.batch_size, rng) for _ in range(args.batches)]

    def step(module):
        def run(kjt):
            out = module(kjt.values(), kjt.offsets())
            out.backward(torch.ones_like(out))
        return run

    for module in kernels.values():  # warm-up: first touches of the rows, allocator
        time_each(step(module), batches[:3])
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for _ in range(args.rounds):
        for k in (*KERNELS, *reversed(KERNELS)):
            times[k] += time_each(step(kernels[k]), batches)
    out = {
        "precision": args.precision, "optimizer": args.optimizer, "threads": args.threads,
        **{f"{k}_median_ms": round(statistics.median(v), 2) for k, v in times.items()},
        **{f"{k}_min_ms": round(min(v), 2) for k, v in times.items()},
    }
    out["fbgemm_over_torch"] = round(out["fbgemm_median_ms"] / out["torch_median_ms"], 2)
    out["fbgemm_over_native"] = round(out["fbgemm_median_ms"] / out["native_median_ms"], 2)
    out["torch_over_native"] = round(out["torch_median_ms"] / out["native_median_ms"], 2)
    for k in KERNELS:
        print(f"{k:7s} {args.precision} {args.optimizer}: median {out[f'{k}_median_ms']:.2f} ms, "
              f"min {out[f'{k}_min_ms']:.2f} ms")
    print(json.dumps(out))
    return out

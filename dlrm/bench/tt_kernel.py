"""Benchmark of the TT embedding lookup: forward+backward time per batch, and memory.

Times one TT table (default 10M rows, dim 16, 3 cores) for a batch of single-hot Zipf ids at
several ranks, for four implementations of the same math:

- ``native``: what `emb=tt` runs on CPU (distinct ids, shared prefix products, our C kernels:
  tt_native.py);
- ``torch``: the same plan in PyTorch ops (`emb.kernel=torch`: grouped middle core, batched GEMMs);
- ``dedup+gather``: PyTorch ops, each distinct prefix copying its core slices (no grouping);
- ``naive``: every lookup gathers its own core slices (TT-Rec's original per-id kernel).

Then the `emb=tt` backend on the 7 largest Kaggle tables (fwd + bwd + the cores' Adagrad step,
fused into backward under the C kernels), C kernels against PyTorch ops, alternating; then the memory of the 7 largest Kaggle tables compressed at rank 32 (cores + Adagrad state)
against the full tables (fp32 + row-wise Adagrad). Run through scripts/bench_tt.py::

    python scripts/bench_tt.py --threads 1            # the figures in docs/benchmarks.md
    python scripts/bench_tt.py --ranks 32 --dist uniform
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dlrm.bench import common

from dlrm.data.schema import KAGGLE_CARDINALITIES
from dlrm.embeddings.base import FP32_BYTES, TableSpec
from dlrm.embeddings.tt_kernels import (
    init_cores,
    pool,
    tt_embedding_bag,
    tt_rows_naive,
    tt_shape,
)

def zipf_ids(n: int, rows: int, alpha: float, rng: np.random.Generator) -> torch.Tensor:
    """`n` ids in [0, rows): Zipf(alpha) ranks scattered over the rows (bench/common.py)."""
    return torch.from_numpy(common.zipf_ids(rng, rows, n, alpha, scatter=True))


def _time(fn, repeats: int, warmup: int = 10) -> dict[str, float]:
    wall, cpu = common.timings(fn, repeats, warmup)
    wall.sort()
    return {"median_ms": statistics.median(wall), "p10_ms": wall[len(wall) // 10], "cpu_ms": statistics.median(cpu)}


def bench_rank(rows: int, dim: int, cores: int, rank: int, ids: torch.Tensor, repeats: int) -> dict:
    """Forward+backward ms of each implementation, and of the Adagrad step, at one rank."""
    shape = tt_shape(rows, dim, cores, rank)
    params = [c.requires_grad_() for c in init_cores(shape)]
    offsets = torch.arange(ids.numel() + 1)

    grad_out = torch.randn(ids.numel(), dim, generator=torch.Generator().manual_seed(1))

    def fresh_grads():  # as the trainer's zero_grad(set_to_none=True): no accumulation
        for p in params:
            p.grad = None

    def native():
        fresh_grads()
        tt_embedding_bag(params, shape, ids, offsets, "sum", kernel="native").backward(grad_out)

    def torch_ops():
        fresh_grads()
        tt_embedding_bag(params, shape, ids, offsets, "sum", kernel="torch").backward(grad_out)

    def dedup_gather():
        fresh_grads()
        tt_embedding_bag(params, shape, ids, offsets, "sum", method="gather", kernel="torch").backward(grad_out)

    def naive():
        fresh_grads()
        rows_ = tt_rows_naive(params, shape, ids)
        pool(rows_, torch.arange(ids.numel()), offsets, "sum").backward(grad_out)

    def forward_only():
        with torch.no_grad():
            tt_embedding_bag(params, shape, ids, offsets, "sum", kernel="native")

    opt = torch.optim.Adagrad(params, lr=0.01, fused=True)  # as emb=tt under PyTorch ops
    native()

    out = {
        "rank": rank,
        "shape": str(shape),
        "params": shape.num_params,
        "distinct_ids": int(torch.unique(ids).numel()),
        "native": _time(native, repeats),
        "native_forward": _time(forward_only, repeats),
        "torch": _time(torch_ops, repeats),
        "dedup_gather": _time(dedup_gather, max(3, repeats // 4)),
        # the naive kernel is 10-50x slower: fewer repeats keep the benchmark short
        "naive": _time(naive, max(3, repeats // 10)),
        "adagrad_step": _time(opt.step, repeats),
    }
    return out


def bench_backend(rank: int, dim: int, batch: int, alpha: float, repeats: int, seed: int) -> dict:
    """The emb=tt backend on the 7 largest Kaggle tables: fwd+bwd+Adagrad step per batch."""
    from omegaconf import OmegaConf
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm.embeddings.tt import TTEmbeddings

    big = [n for n in KAGGLE_CARDINALITIES if n >= 100_000]
    tables = [TableSpec(f"t_{i}", n, dim, (f"F{i}",)) for i, n in enumerate(big)]
    backends = {}
    for kernel in ("native", "torch"):
        torch.manual_seed(seed)
        cfg = OmegaConf.create({"name": "tt", "dim": dim, "pooling": "sum", "rank": rank, "lr": 0.01, "kernel": kernel})
        backends[kernel] = TTEmbeddings(tables, cfg, OmegaConf.create({"lr": 0.01}), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    values = torch.cat([zipf_ids(batch, n, alpha, rng) for n in big])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        [t.features[0] for t in tables], values, torch.ones(len(big) * batch, dtype=torch.long)
    )
    grad_out = torch.randn(batch, dim * len(big), generator=gen)

    def step(emb):
        (opt,) = emb.optimizers()
        opt.zero_grad(set_to_none=True)
        emb(kjt).values().backward(grad_out)
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in backends}
    for i in range(max(5, repeats // 2) + 3):  # alternating, A B B A; the first 3 rounds warm up
        for kernel in backends if i % 2 == 0 else list(backends)[::-1]:
            t0 = time.perf_counter()
            step(backends[kernel])
            if i >= 3:
                times[kernel].append((time.perf_counter() - t0) * 1e3)
    out = {"tables": len(big), "rank": rank}
    for kernel, t in times.items():
        t.sort()
        out[kernel] = {"median_ms": statistics.median(t), "p10_ms": t[len(t) // 10]}
    return out


def kaggle_memory(rank: int, dim: int, cores: int, min_rows: int) -> dict:
    """Bytes of the Kaggle tables with >= min_rows rows: TT cores + Adagrad state vs full."""
    big = [n for n in KAGGLE_CARDINALITIES if n >= min_rows]
    tt = sum(2 * FP32_BYTES * tt_shape(n, dim, cores, rank).num_params for n in big)
    full = sum(TableSpec("t", n, dim, ("f",)).full_bytes() for n in big)
    return {"tables": len(big), "rows": big, "tt_bytes": tt, "full_bytes": full, "ratio": full / tt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_131_227, help="table rows (Kaggle's largest)")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--cores", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--batch", type=int, default=2048, help="single-hot lookups per batch")
    ap.add_argument("--dist", choices=["zipf", "uniform"], default="zipf")
    ap.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if args.dist == "zipf":
        ids = zipf_ids(args.batch, args.rows, args.alpha, np.random.default_rng(args.seed))
    else:
        ids = torch.randint(0, args.rows, (args.batch,), generator=gen)

    print(
        f"TT lookup fwd+bwd, {args.rows:,} x {args.dim}, {args.cores} cores, {args.batch} "
        f"single-hot {args.dist} ids, {args.threads} thread(s), torch {torch.__version__}"
    )
    print(
        "| rank | TT shape | distinct ids | native fwd+bwd ms: median (p10) [thread CPU] "
        "| native fwd ms | torch ops fwd+bwd ms | torch / native | dedup+gather ms | naive per-id ms "
        "| Adagrad step ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for rank in args.ranks:
        r = bench_rank(args.rows, args.dim, args.cores, rank, ids, args.repeats)
        results.append(r)
        f, t = r["native"]["median_ms"], r["torch"]["median_ms"]
        print(
            f"| {rank} | {r['shape']} | {r['distinct_ids']} | {f:.2f} ({r['native']['p10_ms']:.2f}) "
            f"[{r['native']['cpu_ms']:.2f}] | {r['native_forward']['median_ms']:.2f} | {t:.2f} | {t / f:.2f}x "
            f"| {r['dedup_gather']['median_ms']:.2f} | {r['naive']['median_ms']:.1f} "
            f"| {r['adagrad_step']['median_ms']:.2f} |",
            flush=True,
        )
    backend = bench_backend(32, args.dim, args.batch, args.alpha, args.repeats, args.seed)
    nat, ops = backend["native"], backend["torch"]
    print(
        f"\nemb=tt backend, {backend['tables']} largest Kaggle tables, rank 32, {args.batch} zipf "
        f"ids each, fwd+bwd+Adagrad step, alternating: C kernels {nat['median_ms']:.2f} ms median "
        f"(p10 {nat['p10_ms']:.2f}), PyTorch ops {ops['median_ms']:.2f} ms (p10 {ops['p10_ms']:.2f}): "
        f"{ops['median_ms'] / nat['median_ms']:.2f}x"
    )
    mem = kaggle_memory(32, args.dim, args.cores, 100_000)
    print(
        f"\nKaggle tables >= 100000 rows ({mem['tables']}): "
        f"full {mem['full_bytes'] / 2**20:,.1f} MiB "
        f"-> TT rank 32 {mem['tt_bytes'] / 2**20:.2f} MiB with Adagrad state "
        f"({mem['ratio']:.0f}x)"
    )
    report = {
        "args": vars(args),
        "ranks": results,
        "kaggle_backend_rank32": backend,
        "kaggle_memory_rank32": mem,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()

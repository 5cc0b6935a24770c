"""Benchmark: step time of the embedding layer alone under emb=full, hashed and qr.

What one training step costs each backend on a Criteo-shaped batch (26 features, tables at the
Kaggle sizes capped at --max-rows): forward + backward with the fused SGD update, and separately
the extra work hashed/qr do before the lookup (hash, x // m and x % m) and the cost of `stats()`.
Ids are drawn Zipf-like (as in Criteo) within each table. Prints a markdown table.

    python scripts/bench_hashed.py --threads 1 --steps 30
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from omegaconf import OmegaConf

from dlrm.bench.common import median_ms as time_ms
from dlrm.bench.common import zipf_kjt
from dlrm.data.schema import KAGGLE_CARDINALITIES, SPARSE
from dlrm.embeddings import TableSpec, build_embeddings


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    tables = [
        TableSpec(f"t_{f}", rows=min(rows, args.max_rows), dim=args.dim, features=(f,))
        for f, rows in zip(SPARSE, KAGGLE_CARDINALITIES)
    ]
    optim = OmegaConf.create({"name": "sgd", "lr": 0.01})
    rng = np.random.default_rng(0)
    # `hot` ids per bag (1 = single-hot), Zipf(1.05)-ranked ids scattered over each table
    batches = [zipf_kjt(tables, args.batch_size, rng, scatter=True, hot=args.hot) for _ in range(4)]
    settings = [("full", None, None)] + [
        (name, c, comb)
        for c in args.compression
        for name, comb in (("hashed", None), ("qr", "mult"), ("qr", "add"), ("qr", "concat"))
    ]
    results = []
    for name, c, combiner in settings:
        cfg = OmegaConf.create(
            {"name": name, "dim": args.dim, "pooling": "sum", "check_ids": True,
             "compression": c or 1, "combiner": combiner or "mult", "min_rows": args.min_rows}
        )
        emb = build_embeddings(tables, cfg, optim, torch.device("cpu"))
        grad = torch.randn(args.batch_size, args.dim * len(tables))
        i = iter(range(10**9))

        def step(emb=emb):  # bound now: `emb` is deleted below to free the tables
            emb(batches[next(i) % len(batches)]).values().backward(grad)

        step_ms = time_ms(step, args.steps)
        core = emb.parts[0] if hasattr(emb, "parts") else emb
        keys = batches[0].keys()
        b = batches[0].permute([keys.index(f) for f in core.features])  # the compressed features
        prep = {"hashed": lambda: core.hash(b), "qr": lambda: core.split_ids(b)}.get(name)
        results.append({
            "backend": name if not combiner else f"qr-{combiner}",
            "compression": c or 1,
            "ratio": emb.full_bytes() / emb.embedding_bytes(),
            "step_ms": step_ms,
            "prep_ms": time_ms(prep, args.steps) if prep else 0.0,
            "stats_ms": time_ms(emb.stats, 5, warmup=1) if name != "full" else 0.0,
            "MiB": emb.embedding_bytes() / 2**20,
        })
        del emb
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set, not inherited)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting (median reported)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--hot", type=int, default=1, help="ids per bag: 1 = single-hot as in Criteo")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--max-rows", type=int, default=2_000_000, help="cap on table rows (memory)")
    p.add_argument("--min-rows", type=int, default=10_000, help="emb.min_rows: smaller tables stay full")
    p.add_argument("--compression", type=float, nargs="+", default=[4, 16, 64])
    args = p.parse_args(argv)
    rows = run(args)
    print(f"threads={args.threads} batch={args.batch_size} hot={args.hot} dim={args.dim} "
          f"max_rows={args.max_rows} min_rows={args.min_rows} steps={args.steps}\n")
    print("| backend | compression | bytes ratio | MiB | step ms (fwd+bwd+update) | hash/split ms | stats() ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['compression']:g} | {r['ratio']:.1f} | {r['MiB']:.1f} | "
              f"{r['step_ms']:.2f} | {r['prep_ms']:.2f} | {r['stats_ms']:.2f} |")


if __name__ == "__main__":
    main()

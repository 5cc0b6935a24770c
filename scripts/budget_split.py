"""How emb=hybrid spends an emb.budget: per table, its rows, the exact (hot) and hashed rows the
plan gives it, and the share of the train split's lookups that land on exact rows, for both
allocations (emb.allocation=table: the same share of every compressed table's rows, small tables
left full; global: one count threshold over every table's ids).

    python scripts/budget_split.py data/synthetic-2ee8ca1620 --budget 1000 --hot-share 0.5 0.9

Reads the dataset's meta.json and counts/ (written by the first training run with emb=hybrid).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from dlrm.build import table_specs
from dlrm.data.counts import table_counts
from dlrm.embeddings.base import Runtime, yaml_defaults
from dlrm.embeddings.budget import plan_budget
from dlrm.embeddings.hybrid import HybridEmbeddings

ADAGRAD = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", type=Path)
    p.add_argument("--budget", type=float, default=1000)
    p.add_argument("--hot-share", type=float, nargs="+", default=[0.5])
    args = p.parse_args()
    meta = json.loads((args.dataset / "meta.json").read_text())
    tables = table_specs(meta["cardinalities"], 16)
    counts = {t.name: table_counts(args.dataset / "counts", t) for t in tables}
    full = sum(t.full_bytes() for t in tables)
    print(f"budget {args.budget:g}x: {full / args.budget / 2**20:.2f} MiB of {full / 2**20:,.1f} MiB")
    for allocation in ("table", "global"):
        for share in args.hot_share:
            cfg = OmegaConf.create(yaml_defaults("hybrid") | {
                "budget": args.budget, "hot_share": share, "allocation": allocation, "counts": None})
            plan = plan_budget(tables, cfg, ADAGRAD, HybridEmbeddings, Runtime(data_dir=args.dataset))
            hot, buckets = dict(plan.cfg.hot_rows or {}), dict(plan.cfg.buckets or {})
            kept = [t for t in tables if t.features[0] not in hot]
            kept_bytes = sum(t.full_bytes() for t in kept)
            print(f"\nallocation={allocation} hot_share={share}: {plan.ratio:.1f}x, {len(hot)} tables compressed, "
                  f"{len(kept)} full ({kept_bytes / 2**20:.2f} MiB = {kept_bytes / (full / args.budget):.0%} of the budget)")
            print("| table | rows | exact rows | hashed rows | lookups on exact rows |\n|---|---|---|---|---|")
            shares = []
            for t in tables:
                c = np.sort(counts[t.name])[::-1]
                f = t.features[0]
                h = hot.get(f, t.rows)
                shares.append(c[:h].sum() / c.sum())
                if f in hot:
                    print(f"| {f} | {t.rows:,} | {h:,} | {buckets[f]:,} | {shares[-1]:.1%} |")
            print(f"mean over the 26 features of the lookups on exact (or full) rows: {np.mean(shares):.1%}")


if __name__ == "__main__":
    main()

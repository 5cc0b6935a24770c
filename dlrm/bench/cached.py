"""Benchmark: emb=cached (store host / disk) against emb=full on Criteo-shaped batches.

Per setting: the median step time of the embedding layer alone (forward + backward with the
fused row-wise Adagrad update, plus the cache's unique / evict / write-back / load work), the
cache hit rate, evictions and bytes moved per step, and what stays resident
(`embedding_bytes()`, and the process RSS growth while building + training), and for the disk
store the time per step inside its undo journal (reading the old rows and appending them; with
--durable also the fdatasync of each append).

Tables: the 26 Kaggle tables capped at --max-rows; those with >= --min-rows rows are cached.
Ids: Zipf(--alpha) ranks scattered over each table by a multiplicative hash (bench/common.py: hot
ids are not neighbours, as in real data); the warm-start counts are a bincount of an independent sample of
--count-samples ids from the same distribution, written as counts/<feature>.npy.

--disk-rows N adds one extra setting: a single N-row table on disk (cached at --cache-fraction),
for the "table larger than RAM" case; its step time is compared with `full` on the same shape
only if --disk-full is given (full needs N * (dim + 1) * 4 bytes of RAM).

    python scripts/bench_cached.py --threads 1 --steps 30
    python scripts/bench_cached.py --only-disk --disk-rows 20000000 --path /tmp/emb_store
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dlrm.bench.common import zipf_ids, zipf_kjt
from dlrm.data.schema import KAGGLE_CARDINALITIES, SPARSE
from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.cached.disk import DiskStore

def write_counts(tables, alpha, samples, rng, where: Path) -> float:
    """Warm-start counts per table; returns the share of the sample the top 1% of ids take."""
    where.mkdir(parents=True, exist_ok=True)
    top = []
    for t in tables:
        counts = np.bincount(zipf_ids(rng, t.rows, samples, alpha, scatter=True), minlength=t.rows)
        np.save(where / f"{t.features[0]}.npy", counts.astype(np.int64))
        k = max(1, t.rows // 100)
        top.append(np.partition(counts, t.rows - k)[t.rows - k :].sum() / samples)
    return float(np.mean(top))


def rss_kinds() -> dict[str, int]:
    """RssAnon and RssFile of this process, bytes (file pages = reclaimable page cache)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


@contextlib.contextmanager
def timed(owner, attr: str, into: list[float]):
    """Wrap `owner.attr` so that each call appends its wall time (ms) to `into`; restored after."""
    orig = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            into.append((time.perf_counter() - start) * 1e3)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, orig)


def bench(tables, cfg, batches, steps, warmup, dim) -> dict:
    optim = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
    gc.collect()
    rss0 = rss_kinds()
    t0 = time.perf_counter()
    emb = build_embeddings(tables, cfg, optim, torch.device("cpu"))
    build_s = time.perf_counter() - t0
    grad = torch.randn(batches[0].stride(), dim * len(tables))
    times, journal, sync, journal_steps, sync_steps = [], [], [], [], []
    # The disk store's undo journal (and its fdatasync with emb.durable): time per step inside it.
    with timed(DiskStore, "_journal", journal), timed(os, "fdatasync", sync):
        for k in range(warmup + steps):
            start, j0, s0 = time.perf_counter(), len(journal), len(sync)
            emb(batches[k % len(batches)]).values().backward(grad)
            if k >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
                journal_steps.append(sum(journal[j0:]))
                sync_steps.append(sum(sync[s0:]))
    core = emb.parts[0] if hasattr(emb, "parts") else emb
    stats = emb.stats()
    t0 = time.perf_counter()
    if hasattr(core, "flush"):
        core.flush()
    flush_s = time.perf_counter() - t0
    result = {
        "step_ms": statistics.median(times),
        "journal_ms": statistics.median(journal_steps),
        "sync_ms": statistics.median(sync_steps),
        "hit_rate": stats.get("cache_hit_rate", float("nan")),
        "evictions": stats.get("cache_evictions_per_step", 0.0),
        "moved_mib": stats.get("cache_bytes_moved_per_step", 0.0) / 2**20,
        "emb_mib": emb.embedding_bytes() / 2**20,
        "full_mib": emb.full_bytes() / 2**20,
        "anon_mib": (rss_kinds()["RssAnon"] - rss0["RssAnon"]) / 2**20,
        "file_mib": (rss_kinds()["RssFile"] - rss0["RssFile"]) / 2**20,
        "build_s": build_s,
        "flush_s": flush_s,
    }
    del emb, core
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set, not inherited)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting (median reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cache fills, one-off costs)")
    p.add_argument("--batches", type=int, default=40, help="distinct batches cycled through")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    p.add_argument("--max-rows", type=int, default=1_000_000, help="cap on table rows (memory)")
    p.add_argument("--min-rows", type=int, default=100_000, help="emb.min_rows: smaller tables stay full")
    p.add_argument("--cache-fraction", type=float, default=0.01)
    p.add_argument("--policy", default="lfu")
    p.add_argument("--count-samples", type=int, default=2_000_000, help="ids sampled for warm-start counts")
    p.add_argument("--path", default=None, help="dir for the disk stores (default: a temp dir, removed)")
    p.add_argument("--disk-rows", type=int, default=0, help="also bench one table of this many rows on disk")
    p.add_argument("--disk-full", action="store_true", help="and emb=full on that table (needs the RAM)")
    p.add_argument("--readahead", action="store_true", help="disk stores without MADV_RANDOM (emb.random_access=false)")
    p.add_argument("--durable", action="store_true",
                   help="disk stores fdatasync each undo-journal append (emb.durable=true)")
    p.add_argument("--only-disk", action="store_true", help="skip the Kaggle-shaped settings")
    p.add_argument("--disk-warm", choices=("counts", "ids"), default="counts",
                   help="big table: warm start from sampled counts (ids scattered) or ids (ids = ranks; "
                        "saves the rows * 8-byte counts array)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    root = Path(args.path) if args.path else Path(tempfile.mkdtemp(prefix="bench-cached-"))
    root.mkdir(parents=True, exist_ok=True)

    def cached_cfg(store, counts, min_rows, sub):
        shutil.rmtree(root / sub, ignore_errors=True)  # a store left by an earlier run: start afresh
        return OmegaConf.create({
            "name": "cached", "dim": args.dim, "pooling": "sum", "check_ids": True, "store": store,
            "cache_rows": None, "cache_fraction": args.cache_fraction, "policy": args.policy,
            "warm_start": "counts", "counts": str(counts), "path": str(root / sub),
            "min_rows": min_rows, "tables": None, "random_access": not args.readahead,
            "durable": args.durable,
        })  # fmt: skip

    rows_out = []
    try:
        if not args.only_disk:
            tables = [
                TableSpec(f"t_{f}", rows=min(r, args.max_rows), dim=args.dim, features=(f,))
                for f, r in zip(SPARSE, KAGGLE_CARDINALITIES)
            ]
            big = [t for t in tables if t.rows >= args.min_rows]
            top1 = write_counts(big, args.alpha, args.count_samples, rng, root / "counts")
            print(f"Kaggle-shaped: the top 1% of ids take {top1:.3f} of a {args.count_samples:,}-id sample "
                  "(mean over the cached tables)")
            batches = [zipf_kjt(tables, args.batch_size, rng, args.alpha, scatter=True) for _ in range(args.batches)]
            full_cfg = OmegaConf.create({"name": "full", "dim": args.dim, "pooling": "sum", "check_ids": True})
            settings = [("full", full_cfg)] + [
                (f"cached {s}", cached_cfg(s, root / "counts", args.min_rows, f"kaggle_{s}"))
                for s in ("host", "disk")
            ]
            for label, cfg in settings:
                r = bench(tables, cfg, batches, args.steps, args.warmup, args.dim)
                rows_out.append({"setting": label, "tables": f"26 Kaggle, cap {args.max_rows:,}", **r})
        if args.disk_rows:
            one = [TableSpec("t_big", rows=args.disk_rows, dim=args.dim, features=("big",))]
            spread = args.disk_warm == "counts"
            if spread:
                write_counts(one, args.alpha, args.count_samples, rng, root / "counts_big")
            batches = [zipf_kjt(one, args.batch_size, rng, args.alpha, scatter=spread) for _ in range(args.batches)]
            big_cfg = cached_cfg("disk", root / "counts_big", 1, "big")
            big_cfg.warm_start = args.disk_warm
            settings = [("cached disk", big_cfg)]
            if args.disk_full:
                settings.insert(0, ("full", OmegaConf.create({"name": "full", "dim": args.dim, "pooling": "sum"})))
            for label, cfg in settings:
                r = bench(one, cfg, batches, args.steps, args.warmup, args.dim)
                rows_out.append({"setting": label, "tables": f"1 x {args.disk_rows:,}", **r})
    finally:
        if not args.path:
            shutil.rmtree(root, ignore_errors=True)

    print(f"threads={args.threads} batch={args.batch_size} dim={args.dim} alpha={args.alpha} "
          f"cache_fraction={args.cache_fraction} policy={args.policy} warmup={args.warmup} "
          f"steps={args.steps} batches={args.batches} readahead={args.readahead} durable={args.durable}\n")
    print("| setting | tables | step ms | hit rate | evictions/step | MiB moved/step | "
          "embedding MiB (resident) | full MiB | RSS anon growth MiB | RSS file growth MiB | build s | flush s | "
          "journal ms/step | of it fdatasync |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['setting']} | {r['tables']} | {r['step_ms']:.2f} | {r['hit_rate']:.3f} | "
              f"{r['evictions']:.0f} | {r['moved_mib']:.2f} | {r['emb_mib']:.1f} | {r['full_mib']:.1f} | "
              f"{r['anon_mib']:.0f} | {r['file_mib']:.0f} | {r['build_s']:.1f} | {r['flush_s']:.2f} | "
              f"{r['journal_ms']:.2f} | {r['sync_ms']:.2f} |")


if __name__ == "__main__":
    main()

"""Training step time per embedding backend and table size.

A step is the trainer's: DLRM forward, BCE loss, backward (with fused table updates), optimizer
steps. Batches are Criteo-shaped (Zipf ids over the Kaggle vocabulary, capped per `--caps`),
pre-built so only the step is timed. Baseline `ebc_dense_grad`: torchrec's plain
EmbeddingBagCollection with a dense optimizer, which writes a rows-sized gradient every step and
so grows with table size, unlike fused tables.

    python scripts/bench.py                              # full at 1e4 rows vs Kaggle sizes, + baseline
    python scripts/bench.py --backends full tt --caps 0  # what you want, Kaggle sizes
    python scripts/bench.py --json
    python scripts/bench.py --vs-reference [--end-to-end]  # vs the reference DLRM: bench/vs_reference.py

The model here runs eager and in fp32 unless --precision says otherwise; the trainer runs
trainer.precision=auto and trainer.compile=auto. For one backend against another as the trainer
runs them (e.g. the TT/full ratio), use scripts/bench_trainer_step.py --against "emb=tt rank=32".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.bench import vs_reference
from dlrm.bench.common import dlrm_batch
from dlrm.build import build_model, table_specs
from dlrm.data.schema import KAGGLE_CARDINALITIES, SPARSE
from dlrm.embeddings import TableSpec
from dlrm.embeddings.base import EmbeddingBackend
from dlrm.trainer import dense_optimizer

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the shipped defaults are what we measure


class DenseGradEBC(EmbeddingBackend):
    """Baseline: torchrec EmbeddingBagCollection + torch SGD (dense gradients over every row)."""

    name = "ebc_dense_grad"

    def __init__(self, tables: list[TableSpec], lr: float) -> None:
        super().__init__(tables)
        configs = [
            EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows, feature_names=list(t.features))
            for t in tables
        ]
        self.ebc = EmbeddingBagCollection(tables=configs)
        self.opt = torch.optim.SGD(self.ebc.parameters(), lr=lr)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(features)

    def embedding_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.ebc.parameters())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]


def make_batches(cards: list[int], batch_size: int, n: int, seed: int = 0):
    """`n` (dense, KJT, labels) batches over one table per Criteo feature of `cards` rows."""
    rng = np.random.default_rng(seed)
    tables = table_specs(dict(zip(SPARSE, cards)), 1)  # only rows and features matter here
    return [dlrm_batch(tables, batch_size, rng) for _ in range(n)]


def build(backend: str, cards: list[int], cfg):
    cardinalities = dict(zip(SPARSE, cards))
    emb = None
    if backend == "ebc_dense_grad":
        emb = DenseGradEBC(table_specs(cardinalities, cfg.emb.dim), lr=cfg.optim.sparse.lr)
    model = build_model(cfg, cardinalities, torch.device("cpu"), 13, embeddings=emb)
    opts = [dense_optimizer(model.dense_parameters(), cfg.optim.dense), *model.sparse_arch.optimizers()]
    return model, opts


def time_steps(model, opts, batches, warmup: int) -> list[float]:
    times = []
    for i, (dense, kjt, labels) in enumerate(batches):
        t0 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def compose(backend: str, overrides: list[str]):
    emb = "full" if backend == "ebc_dense_grad" else backend
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=[f"emb={emb}", "data.root=unused", *overrides])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["full", "ebc_dense_grad"])
    p.add_argument("--caps", nargs="+", type=int, default=[10_000, 0], help="table row caps; 0 = Kaggle sizes")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default=None, help="fp32 | bf16 | auto (default fp32; auto with --vs-reference)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rank=16 optim.sparse.name=rowwise_adagrad")
    vs_reference.add_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.vs_reference:
        return [vs_reference.run(args, compose, build, make_batches)]
    args.precision = args.precision or "fp32"
    rows = []
    for cap in args.caps:
        cards = [min(c, cap) if cap else c for c in KAGGLE_CARDINALITIES]
        batches = make_batches(cards, args.batch_size, args.steps + args.warmup)
        for backend in args.backends:
            cfg = compose(backend, [f"trainer.precision={args.precision}", *args.overrides])
            model, opts = build(backend, cards, cfg)
            steps = args.steps if backend != "ebc_dense_grad" or cap and cap <= 100_000 else min(args.steps, 5)
            times = time_steps(model, opts, batches[: steps + args.warmup], args.warmup)
            ms = statistics.median(times) * 1e3
            row = {
                "backend": backend,
                "rows": sum(cards),
                "cap": cap or "kaggle",
                "batch_size": args.batch_size,
                "threads": args.threads,
                "precision": args.precision,
                "step_ms": round(ms, 2),
                "samples_per_s": round(args.batch_size / ms * 1e3),
                "embedding_mb": round(model.sparse_arch.embedding_bytes() / 2**20, 1),
            }
            rows.append(row)
            print(json.dumps(row) if args.json else _fmt(row), flush=True)
            del model, opts
    return rows


def _fmt(r: dict) -> str:
    return (
        f"{r['backend']:>16}  rows {r['rows']:>11,}  {r['precision']}  {r['threads']} thr  "
        f"step {r['step_ms']:8.1f} ms  {r['samples_per_s']:>8,} samples/s  emb {r['embedding_mb']:>9,.1f} MB"
    )


if __name__ == "__main__":
    main()

"""`scripts/bench.py --vs-reference`: our trainer's step against the reference DLRM's, side by side.

Both on the same batches in one process, interleaved (dlrm/bench/reference.py): the reference
(per-table EmbeddingBag, eager fp32, sparse SGD) and `Trainer.train_step` as `python -m
dlrm.train` builds it (default config + overrides: precision auto, fused optimizers,
`trainer.compile`). With `--end-to-end`, a default training run (`python -m dlrm.train`, loading,
logging, compile and eval included) runs between two reference measurements, and its samples/s
(after warm-up, and over the whole command's wall clock) is divided by the reference's
step-only samples/s (the mean of the two medians; also against its fastest step, a lower bound for us when other
jobs load the machine):

    python scripts/bench.py --vs-reference                    # step vs step, Kaggle sizes
    python scripts/bench.py --vs-reference --end-to-end       # + the default run end to end
    python scripts/bench.py --vs-reference --precision fp32 trainer.compile=true
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dlrm.bench.common import median_ms, time_each
from dlrm.bench.reference import compare
from dlrm.data.schema import KAGGLE_CARDINALITIES
from dlrm.model import resolve_precision
from dlrm.trainer import Trainer

REFERENCE_LR = 0.1  # SGD learning rate of the baseline (its speed does not depend on it)


def add_arguments(p) -> None:
    p.add_argument("--vs-reference", action="store_true", help="our step vs the reference DLRM's (Kaggle sizes)")
    p.add_argument("--end-to-end", action="store_true", help="with --vs-reference: also a default training run")


def run(args, compose, build, make_batches) -> dict:
    """The comparison; `compose`, `build`, `make_batches` are dlrm.bench.steps' (passed in to
    keep the import one-way). Prints one line per figure and returns them as a dict."""
    precision = resolve_precision(args.precision or "auto", torch.device("cpu"))
    cards = list(KAGGLE_CARDINALITIES)
    cfg = compose("full", [f"trainer.precision={precision}", *args.overrides])
    model, _ = build("full", cards, cfg)
    trainer = Trainer(cfg, model, None, None, None, torch.device("cpu"))
    batches = make_batches(cards, args.batch_size, args.steps + args.warmup)
    bottom, top = list(cfg.model.bottom_mlp), list(cfg.model.top_mlp)
    r = compare(trainer.train_step, batches, REFERENCE_LR, cfg.emb.dim, bottom, top, cards, args.warmup)
    floor_ms = gemm_floor_ms(model, args.batch_size, precision, args.steps)
    tables = tables_ms(model.sparse_arch, [kjt for _, kjt, _ in batches], args.warmup)
    del trainer, model
    out = {"precision": precision, "threads": args.threads, "batch_size": args.batch_size, **r,
           "gemm_floor_ms": floor_ms, "tables_ms": tables}
    print(
        f"step only, batch {args.batch_size}, {args.threads} threads, {r['pairs']} interleaved pairs: "
        f"reference (fp32, sparse SGD) {r['reference_ms']:.1f} ms (min {r['reference_min_ms']:.1f}), "
        f"ours ({precision}) {r['ours_ms']:.1f} ms (min {r['ours_min_ms']:.1f}); "
        f"reference/ours {r['ratio']:.2f}x\n"
        f"the MLPs' GEMMs alone ({precision}, forward + both backward GEMMs of every layer): "
        f"{floor_ms:.1f} ms; the tables alone (lookup, backward, fused {cfg.optim.sparse.name}): "
        f"{tables:.1f} ms; together a floor under any step of this model here, "
        f"{floor_ms + tables:.1f} ms = reference/{r['reference_ms'] / (floor_ms + tables):.2f}",
        flush=True,
    )
    if args.end_to_end:
        out.update(_end_to_end(args, precision, r, batches, cfg, bottom, top, cards))
    if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    return out


def gemm_floor_ms(model: torch.nn.Module, batch_size: int, precision: str, reps: int = 30) -> float:
    """Median ms of the matrix products every training step of `model` must do: for each
    `nn.Linear` (in -> out) at batch B, forward [B, in] x [in, out], and backward's two GEMMs
    (grad input [B, out] x [out, in], grad weight [out, B] x [B, in]), in `precision` (bf16 or
    fp32), on random data. Nothing else (embeddings, interaction, optimizer, casts) is in it, so
    it is a floor under any step of this model on this CPU, not a step time."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ops = []
    for n_in, n_out in shapes:
        x, w = torch.randn(batch_size, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype)
        gy = torch.randn(batch_size, n_out, dtype=dtype)
        ops.append((x, w, gy))

    def step() -> None:
        for x, w, gy in ops:
            torch.mm(x, w.t())
            torch.mm(gy, w)
            torch.mm(gy.t(), x)

    return median_ms(step, reps, warmup=3)


def tables_ms(sparse_arch: torch.nn.Module, kjts: list, warmup: int) -> float:
    """Median ms of the embedding backend alone on `kjts`: lookup, backward of a ones gradient
    and the fused optimizer update (fbgemm applies it inside backward), nothing else."""

    def step(kjt) -> None:
        pooled = sparse_arch(kjt).values()
        pooled.backward(torch.ones_like(pooled))

    return statistics.median(time_each(step, kjts, warmup))


def _end_to_end(args, precision, first, batches, cfg, bottom, top, cards) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dlrm.train", "trainer.progress=false", f"hydra.run.dir={tmp}",
               f"trainer.precision={precision}", *args.overrides]
        print("running:", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        command_s = time.perf_counter() - t0
        res = json.loads((Path(tmp) / "results.json").read_text())
    # the reference again, after the run: the machine's load may have changed meanwhile
    again = compare(lambda b: None, batches, REFERENCE_LR, cfg.emb.dim, bottom, top, cards, args.warmup)
    ref_ms = (first["reference_ms"] + again["reference_ms"]) / 2
    ref_sps = args.batch_size / ref_ms * 1e3
    # the reference's fastest step: what it would do on a quiet machine, at most; a ratio against
    # it is a lower bound on ours when other jobs load the machine
    ref_best_sps = args.batch_size / min(first["reference_min_ms"], again["reference_min_ms"]) * 1e3
    whole = res["samples"] / command_s
    out = {
        "reference_samples_per_s": ref_sps,
        "train_samples_per_s": res["samples_per_s"],
        "train_whole_command_samples_per_s": whole,
        "train_step_time_ms": res["step_time_ms"],
        "train_auc": res["auc"],
        "train_steps": res["steps"],
        "ratio_after_warmup": res["samples_per_s"] / ref_sps,
        "ratio_whole_command": whole / ref_sps,
        "reference_best_samples_per_s": ref_best_sps,
        "ratio_after_warmup_vs_best": res["samples_per_s"] / ref_best_sps,
        "ratio_whole_command_vs_best": whole / ref_best_sps,
    }
    print(
        f"reference step only {ref_sps:,.0f} samples/s ({first['reference_ms']:.1f} ms before, "
        f"{again['reference_ms']:.1f} ms after the run)\n"
        f"python -m dlrm.train ({res['steps']} steps, AUC {res['auc']:.4f}): "
        f"{res['samples_per_s']:,.0f} samples/s after warm-up (median step {res['step_time_ms']:.1f} ms), "
        f"{whole:,.0f} samples/s over the whole command ({command_s:.0f} s)\n"
        f"end to end / reference step only: {out['ratio_after_warmup']:.2f}x after warm-up, "
        f"{out['ratio_whole_command']:.2f}x whole command; against the reference's fastest step "
        f"({ref_best_sps:,.0f} samples/s): {out['ratio_after_warmup_vs_best']:.2f}x / "
        f"{out['ratio_whole_command_vs_best']:.2f}x",
        flush=True,
    )
    return out

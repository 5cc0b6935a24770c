"""Where the seeds' AUC spread comes from: eval-sample noise or training noise.

Scores each trained run (its last checkpoint: train with `trainer.checkpoint_every=<max_steps>`)
on the eval split of its dataset, cut into `--subsets` equal consecutive slices, and prints per run
the AUC of each slice and of the whole split; then, per group of runs (same config but the seed):

- `eval_sd`: std over slices of one run's AUC (the noise of one slice as an eval set, unpaired);
- `paired_sd`: std over slices of the AUC difference between two seeds scored on the same slice
  (what eval-sample noise adds to the seed spread of a *fixed* eval set of one slice's size);
- `seed_sd_slice`: the std over seeds on one slice (mean over slices; what a recipe with that
  many eval rows reports), and `seed_sd_all`: the std over seeds on the whole split.

If seed_sd_all is about seed_sd_slice, the spread is training noise (init, batch order): more
eval rows cannot remove it. Example (docs/results.md, "Where the seeds' spread comes from"):

    python -m dlrm.train -m +experiment=compression_grid '+experiment/compression_grid=full,hashed_x10' \
        seed=1,2,3 data.eval_rows=2000000 trainer.checkpoint_every=1000 hydra.sweep.dir=multirun/noise
    python scripts/eval_noise.py multirun/noise --subsets 10 --out multirun/noise/noise.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_auroc

from dlrm import checkpoint
from dlrm.build import build_model
from dlrm.data.loader import ParquetLoader
from dlrm.data.schema import SPARSE
from dlrm.embeddings import Runtime
from dlrm.io import atomic_write_text
from dlrm.train import dataset_path


@torch.no_grad()
def predictions(run: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(config, logits [N], labels [N]) of the run's last checkpoint over its whole eval split."""
    files = checkpoint.checkpoint_files(run / checkpoint.CHECKPOINT_DIR)
    if not files:
        raise SystemExit(f"{run}: no checkpoints/step-N.pt (train with trainer.checkpoint_every)")
    ckpt = checkpoint.load(files[max(files)])
    cfg = OmegaConf.create(ckpt["config"])
    path = dataset_path(cfg.data)
    data = ParquetLoader(path, cfg.data.eval_split, shuffle=False, pad=True, batch_size=cfg.trainer.batch_size,
                         max_rows=cfg.data.get("max_rows", 0))
    cards = {f: data.cardinalities[f] for f in SPARSE}
    model = build_model(cfg, cards, torch.device("cpu"), data.dense_width, Runtime(seed=cfg.seed, data_dir=path))
    model.load_state_dict(ckpt["dense"], strict=False)
    model.sparse_arch.load_checkpoint_state(ckpt["embeddings"])
    model.eval()
    logits, labels = [], []
    for batch in data.epoch(0):
        logits.append(model(batch.dense, batch.sparse).float().reshape(-1))
        labels.append(batch.labels.reshape(-1))
    return ckpt["config"], torch.cat(logits).numpy(), torch.cat(labels).numpy()


def auc(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.from_numpy(logits), torch.from_numpy(labels).long()))


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line (module docstring); returns the per-group summaries it prints."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run dirs or sweep dirs (runs found below)")
    p.add_argument("--subsets", type=int, default=10, help="equal consecutive slices of the eval split")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    runs = sorted({c.parent.parent for d in args.dirs for c in d.rglob(f"{checkpoint.CHECKPOINT_DIR}/step-*.pt")})
    if not runs:
        raise SystemExit(f"no run with checkpoints under {[str(d) for d in args.dirs]}")
    groups: dict[str, list[dict]] = {}
    for run in runs:
        config, logit, label = predictions(run)
        n = len(label) // args.subsets
        row = {
            "run": str(run), "seed": config["seed"], "rows": len(label), "slice_rows": n,
            "auc_all": auc(logit, label),
            "auc_slices": [auc(logit[i * n:(i + 1) * n], label[i * n:(i + 1) * n]) for i in range(args.subsets)],
        }
        print(json.dumps({k: v for k, v in row.items() if k != "auc_slices"}), flush=True)
        key = json.dumps({k: v for k, v in config.items() if k not in ("seed", "trainer")}, sort_keys=True, default=str)
        row["group"] = f"{config['emb']['name']} budget={config['emb'].get('budget')}"
        groups.setdefault(key, []).append(row)
    summary = []
    for rows in groups.values():
        slices = np.array([r["auc_slices"] for r in rows])  # [seeds, subsets]
        pairs = [slices[i] - slices[j] for i, j in itertools.combinations(range(len(rows)), 2)]
        out = {
            "group": rows[0]["group"], "seeds": [r["seed"] for r in rows], "slice_rows": rows[0]["slice_rows"],
            "rows": rows[0]["rows"], "auc_all": [r["auc_all"] for r in rows],
            "eval_sd": float(np.mean([np.std(s, ddof=1) for s in slices])),
            "paired_sd": float(np.mean([np.std(d, ddof=1) for d in pairs])) if pairs else None,
            "seed_sd_slice": float(np.mean(np.std(slices, axis=0, ddof=1))) if len(rows) > 1 else None,
            "seed_sd_all": statistics.stdev(r["auc_all"] for r in rows) if len(rows) > 1 else None,
        }
        summary.append(out | {"runs": rows})
        print(json.dumps({k: v for k, v in out.items()}), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

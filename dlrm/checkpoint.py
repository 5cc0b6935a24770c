"""Training checkpoints: `<run dir>/checkpoints/step-N.pt`, each the whole trainer state.

A checkpoint holds the dense model, the embedding backend's `checkpoint_state()` (tables and
their fused optimizer state, cache bookkeeping), every optimizer's state, the RNGs, the data
position (epoch, batches read in it) and the config that shaped the model, so a resumed run
continues the same trajectory: same batches, same updates.

A disk-backed cache (`emb=cached emb.store=disk`) keeps its table outside the checkpoint, so the
two are committed in order: the checkpoint file first (written whole, then renamed), then the
store's flush tagged with the same step. A crash between the two leaves the store at the previous
checkpoint's step, which is why the newest two checkpoints are kept and resuming picks the one
whose step the store committed.

    python -m dlrm.train trainer.checkpoint_every=200                   # writes checkpoints
    python -m dlrm.train trainer.resume=outputs/2026-11-24/10-00-00     # continues that run
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from dlrm.io import atomic_path

CHECKPOINT_DIR = "checkpoints"
KEEP = 2  # newest checkpoints kept: see the module docstring
# Config that must match between a checkpoint and the run resuming it: it shapes the model, its
# optimizers or the data order. Everything else (max_steps, eval, logging, threads) may change.
MUST_MATCH = ("emb", "model", "optim", "data", "seed", "rank", "compression", "trainer.batch_size")

_NAME = re.compile(r"step-(\d+)\.pt")


def checkpoint_files(directory: Path) -> dict[int, Path]:
    """step -> file of the checkpoints in `directory`."""
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): f for f in directory.iterdir() if (m := _NAME.fullmatch(f.name))}


def save(directory: Path, step: int, payload: dict) -> Path:
    """Write `payload` as step-<step>.pt: to a temp file, synced, then renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step}.pt"
    with atomic_path(final, durable=True) as tmp:
        torch.save(payload, tmp)
    return final


def prune(directory: Path, keep: int = KEEP) -> None:
    """Remove all but the newest `keep` checkpoints."""
    files = checkpoint_files(directory)
    for step in sorted(files)[:-keep]:
        files[step].unlink()


def run_dir_of(source: str | Path) -> Path:
    """The run directory that `trainer.resume` points at (a run dir, its checkpoints/ or a file)."""
    source = Path(source)
    if source.is_file() and source.parent.name == CHECKPOINT_DIR:
        return source.parent.parent
    if source.is_dir() and source.name == CHECKPOINT_DIR:
        return source.parent
    if (source / CHECKPOINT_DIR).is_dir():
        return source
    raise FileNotFoundError(
        f"trainer.resume={str(source)!r}: no checkpoints there (expected a run directory holding "
        f"{CHECKPOINT_DIR}/step-N.pt, written with trainer.checkpoint_every > 0)"
    )


def find(source: str | Path, committed_step: int | None) -> Path:
    """The checkpoint to resume from: the given file, else the newest in the run directory; when
    the embeddings' store committed a step, exactly that step's checkpoint."""
    source = Path(source)
    files = checkpoint_files(run_dir_of(source) / CHECKPOINT_DIR)
    if source.is_file():
        step = int(_NAME.fullmatch(source.name).group(1)) if _NAME.fullmatch(source.name) else None
        if committed_step is not None and step != committed_step:
            raise ValueError(
                f"trainer.resume={str(source)!r}: the embeddings' disk store holds step "
                f"{committed_step}, not this checkpoint's; resume from step-{committed_step}.pt"
            )
        return source
    if not files:
        raise FileNotFoundError(f"trainer.resume={str(source)!r}: no step-N.pt checkpoints found")
    if committed_step is None:
        return files[max(files)]
    if committed_step not in files:
        raise ValueError(
            f"trainer.resume={str(source)!r}: the embeddings' disk store holds step "
            f"{committed_step}, but there is no step-{committed_step}.pt (have {sorted(files)})"
        )
    return files[committed_step]


def load(path: Path) -> dict:
    # Our own files, holding numpy RNG state and plain dicts: not weights-only loadable.
    return torch.load(path, map_location="cpu", weights_only=False)


def check_config(saved: dict, current: dict, path: Path) -> None:
    """One clear error naming the settings that differ from the checkpoint's run."""

    def get(cfg: dict, key: str):
        for part in key.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        return cfg

    def strip(node, key: str):  # where the data lives may move; what it is may not
        if key == "data" and isinstance(node, dict):
            return {k: v for k, v in node.items() if k not in ("root", "path", "workers")}
        if key == "emb" and isinstance(node, dict):
            # emb.path: where a disk store lives may move too. emb.resume: written into the
            # config by runs before the Runtime argument existed; ignored in their checkpoints.
            return {k: v for k, v in node.items() if k not in ("path", "resume")}
        return node

    differ = [k for k in MUST_MATCH if strip(get(saved, k), k) != strip(get(current, k), k)]
    if differ:
        raise ValueError(
            f"{path}: checkpoint was written with other settings for {differ}; resume with the "
            "same emb/model/optim/data settings, seed and batch size"
        )


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])

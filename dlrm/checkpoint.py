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

Safety: checkpoints are read with `torch.load(weights_only=True)`: tensors and plain Python data
only (numpy RNG state is stored as a tensor), so a file from someone else cannot run code when
unpickled; one holding anything else is refused with one line naming what it holds.
Identity: each checkpoint records its dataset's identity (`dataset_identity`: table sizes, split
files and row counts from meta.json, never absolute paths), so a moved copy of the dataset
resumes and another dataset is refused naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from dlrm.config import flatten
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


# Checkpoints written before the RNG state was stored as a tensor hold one numpy uint32 array:
# numpy's array reconstruction is allow-listed for that (it builds arrays, it runs no code).
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
try:  # numpy >= 2 pickles arrays through numpy._core, older numpy through numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
_NUMPY_GLOBALS.append(_reconstruct)
_UNSAFE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def precheck(source: str | Path, config: dict, meta, data_path: Path) -> Path:
    """Check a resume before the model is built (tens of seconds for big tables): the newest
    checkpoint of `source` must have been written with this run's settings (`config`, the
    resolved run config) on this dataset (`meta`, its DatasetMeta, at `data_path`). Reads the
    checkpoint memory-mapped, so its tensors are not loaded. Raises what `find`, `load`,
    `check_config` and `check_dataset` raise (one line each); returns the checkpoint checked."""
    path = find(source, None)  # every checkpoint of a run holds the same config and dataset
    ckpt = load(path, mmap=True)
    check_config(ckpt["config"], config, path)
    check_dataset(ckpt.get("dataset"), dataset_identity(meta), path, data_path)
    return path


def load(path: Path, mmap: bool = False) -> dict:
    """A checkpoint as saved, read weights-only: tensors and plain data, no code (`mmap`: its
    tensors memory-mapped from the file, read only when touched).

    Raises ValueError (one line naming the file and what it holds) for a checkpoint holding any
    other object, and for a file that is not a checkpoint at all.
    """
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = _UNSAFE.search(str(e))
        if m is None:  # garbage, not a pickle of ours
            raise ValueError(f"{path}: not a readable checkpoint ({' '.join(str(e).split())[-200:]})") from None
        what = m.group(1)
        raise ValueError(
            f"{path}: refused: it holds {what}, not tensors or plain data; loading it could run "
            "code (checkpoints are read with torch.load(weights_only=True))"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated, or not a torch file
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise ValueError(f"{path}: not a dlrm checkpoint (no training state in it)")
    return ckpt


def dataset_identity(meta) -> dict:
    """What makes a dataset itself, from its meta.json (`DatasetMeta`): table sizes, split files
    (relative names) and row counts, plus a short sha256 fingerprint of them. Absolute paths and
    `extra` (statistics such as preprocessing speed) are left out, so a moved copy matches."""
    ident = {
        "cardinalities": dict(meta.cardinalities),
        "splits": {k: list(v) for k, v in meta.splits.items()},
        "rows": dict(meta.rows),
        "multi_hot": dict(meta.multi_hot),
    }
    text = json.dumps(ident, sort_keys=True)
    return {**ident, "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16]}


def check_dataset(saved: dict | None, current: dict, path: Path, data_path: Path) -> None:
    """One clear error naming what differs between the checkpoint's dataset and this run's."""
    if saved is None or saved.get("fingerprint") == current["fingerprint"]:
        return  # (None: a checkpoint from before identities were recorded: nothing to compare)
    differ = []
    for key, what in (("cardinalities", "table sizes"), ("rows", "row counts"), ("splits", "split files"),
                      ("multi_hot", "multi-hot features")):
        a, b = saved.get(key, {}), current[key]
        names = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if names:
            shown = ", ".join(f"{k} {a.get(k, '-')} vs {b.get(k, '-')}" if key != "splits" else k for k in names[:3])
            differ.append(f"{what} ({shown}{', ...' if len(names) > 3 else ''})")
    raise ValueError(
        f"{path}: checkpoint was trained on another dataset than {data_path}: "
        f"{'; '.join(differ) or 'fingerprint differs'} (checkpoint vs this run); resume on the same data"
    )


def check_config(saved: dict, current: dict, path: Path) -> None:
    """One clear error naming the settings that differ from the checkpoint's run."""

    def get(cfg: dict, key: str):
        for part in key.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        return cfg

    # A checkpoint that records optim.sparse.kernel resumes under any table kernel: the trainer
    # converts between the kernels' layouts (per-table copies) or names the one to use
    # (checkpoint.check_table_kernel); native and torch even share one.
    kernel_recorded = isinstance(get(saved, "optim.sparse"), dict) and "kernel" in get(saved, "optim.sparse")

    def strip(node, key: str):  # where the data lives may move; what it is may not
        if key == "data" and isinstance(node, dict):
            return {k: v for k, v in node.items() if k not in ("root", "path", "workers")}
        if key == "emb" and isinstance(node, dict):
            # emb.path: where a disk store lives may move too. emb.resume: written into the
            # config by runs before the Runtime argument existed; ignored in their checkpoints.
            # emb.kernel (and emb.tt.kernel under emb=cached): TT's C kernels or PyTorch ops
            # train the same cores and Adagrad state, so either resumes the other's checkpoint.
            node = {k: v for k, v in node.items() if k not in ("path", "resume", "kernel")}
            if isinstance(node.get("tt"), dict):
                node["tt"] = {k: v for k, v in node["tt"].items() if k != "kernel"}
            return node
        if key == "model" and isinstance(node, dict):
            # model.kernel: the C kernels or PyTorch ops (interaction, MLP ReLUs) compute the same
            # function with the same parameters
            return {k: v for k, v in node.items() if k != "kernel"}
        if key == "optim" and isinstance(node, dict) and isinstance(node.get("sparse"), dict):
            if kernel_recorded:
                return {**node, "sparse": {k: v for k, v in node["sparse"].items() if k != "kernel"}}
            # before optim.sparse.kernel existed, every table ran in fbgemm's kernel
            return {**node, "sparse": {"kernel": "fbgemm", **node["sparse"]}}
        return node

    differ = [k for k in MUST_MATCH if strip(get(saved, k), k) != strip(get(current, k), k)]
    if differ:
        kernel = get(strip(get(saved, "optim"), "optim"), "sparse.kernel")
        hint = f" (its tables were written by the {kernel} kernel: add optim.sparse.kernel={kernel})" if (
            differ == ["optim"] and kernel != get(current, "optim.sparse.kernel")
        ) else ""
        # the settings themselves, with both values: `model.top_mlp=[...] in the checkpoint, [32, 1] now`
        keys = []
        for k in differ:
            a, b = flatten(strip(get(saved, k), k), k), flatten(strip(get(current, k), k), k)
            keys += [(key, a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]
        shown = "; ".join(f"{key}={_shown(x)} in the checkpoint, {_shown(y)} now" for key, x, y in keys[:3])
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        raise ValueError(
            f"{path}: checkpoint was written with other settings: {shown}{more}; resume with the "
            f"same emb/model/optim/data settings, seed and batch size{hint}"
        )


def _shown(value) -> str:
    """A config value as typed on a command line (tuples from `flatten` as lists; unset as null)."""
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def check_table_kernel(saved: str | None, current: str, path: Path) -> None:
    """One clear error when the checkpoint's tables were written by another table kernel than
    the one this run resolved (`optim.sparse.kernel=auto` is ours on CPU and fbgemm's on CUDA, so
    the same setting may differ between machines): their state layouts differ. Checkpoints from
    before this was recorded (None) are left to `check_config`."""
    if saved is not None and saved != current:
        raise ValueError(
            f"{path}: its tables were written by the {saved} table kernel, this run resolved "
            f"optim.sparse.kernel to {current} (auto differs between CPU and CUDA); resume with "
            f"optim.sparse.kernel={saved}"
        )


def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors and plain data (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys, *rest))
    random.setstate(state["python"])

"""Several processes: torch.distributed from the torchrun environment, rank helpers.

`torchrun --nproc_per_node=N -m dlrm.train ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT set; `init()` joins them into one process group (gloo on CPU,
NCCL on CUDA) only when WORLD_SIZE > 1, so a plain `python -m dlrm.train` never touches
torch.distributed. Everything here works (and answers rank 0 of 1) without a process group.

Only rank 0 writes outputs (results.json, TensorBoard, logs, the progress bar); the other ranks
compute and take part in collectives. See docs/distributed.md.

Example::

    env = init("cpu")                  # Env(rank=0, world_size=2, local_rank=0) under torchrun
    if is_main():
        ...                            # write files
    peaks = gather_object(peak_rss)    # [rank 0's, rank 1's] on every rank
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# A collective that waits longer than this fails instead of hanging (a dead rank, a rank that
# raised before reaching it). Minutes: sharded checkpoints of large tables take a while.
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("DLRM_DIST_TIMEOUT_MIN", "10")))


@dataclass(frozen=True)
class Env:
    """This process's place: `rank` in [0, world_size), `local_rank` on its node (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_environ() -> Env:
    """The Env torchrun (or srun + torchrun) describes in the environment; rank 0 of 1 without it."""
    return Env(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init(device_type: str) -> Env:
    """Join the process group when WORLD_SIZE > 1 (gloo for `cpu`, NCCL for `cuda`); a no-op
    otherwise, or when already joined. Returns this process's Env."""
    env = from_environ()
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return env


def shutdown() -> None:
    """Leave the process group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects); [obj] alone."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank; `obj` itself alone."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (in place, on a CPU copy for gloo), returned; `t` alone."""
    if active():
        dist.all_reduce(t)
    return t


def hydra_overrides_for_rank(argv: list[str]) -> list[str]:
    """`argv` with Hydra overrides that keep ranks other than 0 from writing: no `.hydra/` config
    copy, no log file, an empty scratch run dir ($TMPDIR/dlrm-rank<R>); outputs go to rank 0's
    dir (`dlrm.train` takes it from rank 0). Rank 0 and single-process runs get `argv` unchanged.

    A multirun (`-m`) under several processes is refused: each rank would sweep on its own."""
    env = from_environ()
    if not env.distributed:
        return argv
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise SystemExit("error: a sweep (-m) cannot run under torchrun; launch one torchrun per job")
    if env.rank == 0:
        return argv
    # Hydra makes this dir; nothing is written into it. One fixed (empty) dir per rank number,
    # shared by runs, so a killed run leaves nothing new behind.
    scratch = os.path.join(tempfile.gettempdir(), f"dlrm-rank{env.rank}")
    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none",
            f"hydra.run.dir={scratch}"]


def patch_argv() -> None:
    """Apply `hydra_overrides_for_rank` to sys.argv (called before Hydra parses it)."""
    sys.argv[:] = hydra_overrides_for_rank(sys.argv)

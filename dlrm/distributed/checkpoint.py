"""Checkpoints of a sharded run: torch.distributed.checkpoint (DCP) for the model, one file for
the rest. Same directory and resume rules as single-process checkpoints (dlrm/checkpoint.py):

    checkpoints/step-N.dcp/   every rank writes its own shards (tables, their fused optimizer
                              state) and rank 0 the replicated tensors (MLPs, TT cores, data-
                              parallel tables), through DCP's planner: no tensor is written twice
    checkpoints/step-N.pt     rank 0, after every rank finished the .dcp: counters, the
                              non-fused optimizers (replicated: rank 0's copy), RNG, config,
                              world size. Written last and atomically, so its presence means
                              the checkpoint is whole; `trainer.resume` finds these files.

Resume needs the same world size (the plan, and so each rank's shards, follow from it): another
world size is refused with one line. DCP: https://pytorch.org/docs/stable/distributed.checkpoint.html
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dlrm import checkpoint, distributed
from dlrm.trainer import Trainer

log = logging.getLogger(__name__)


def _sharded_dir(pt: Path) -> Path:
    return pt.with_suffix(".dcp")


class DistributedTrainer(Trainer):
    """The Trainer of a DMP-wrapped model (`DistributedDLRM`): checkpoints through DCP."""

    def _sharded_state(self) -> dict:
        dmp = self.model.dmp
        return {"model": dmp.state_dict(), "fused_optim": dmp.fused_optimizer.state_dict()}

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N.dcp (all ranks) then checkpoints/step-N.pt (rank 0); newest two kept."""
        s = self.state
        t0 = time.perf_counter()
        final = self.checkpoint_dir / f"step-{s.step}.pt"
        sharded = _sharded_dir(final)
        if distributed.is_main():
            shutil.rmtree(sharded, ignore_errors=True)  # a partial one from a crash at this step
        dist.barrier()
        dcp.save(self._sharded_state(), checkpoint_id=str(sharded))
        dist.barrier()  # every rank's shards are on disk before the .pt says so
        if distributed.is_main():
            payload = {
                "step": s.step,
                "epoch": s.epoch,
                "epoch_batches": s.epoch_batches,
                "samples": s.samples,
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "rng": checkpoint.rng_state(),
                "config": self.run_config,
                "world_size": distributed.world_size(),
            }
            checkpoint.save(self.checkpoint_dir, s.step, payload)
            kept = set(checkpoint.checkpoint_files(self.checkpoint_dir).values())
            checkpoint.prune(self.checkpoint_dir)
            for pt in kept - set(checkpoint.checkpoint_files(self.checkpoint_dir).values()):
                shutil.rmtree(_sharded_dir(pt), ignore_errors=True)
            size = sum(f.stat().st_size for f in sharded.rglob("*") if f.is_file())
            log.info("checkpoint %s (+ .dcp, %.2f GB, %.1f s)", final, size / 1e9, time.perf_counter() - t0)
        dist.barrier()
        return final

    def resume(self, source: str | Path) -> Path:
        """Load the newest (or the given) step-N.pt and its step-N.dcp; same world size only."""
        path = checkpoint.find(source, None)
        ckpt = checkpoint.load(path)
        checkpoint.check_config(ckpt["config"], self.run_config, path)
        saved_world = ckpt.get("world_size", 1)
        if saved_world != distributed.world_size():
            raise ValueError(
                f"{path}: written by {saved_world} process(es), resumed with {distributed.world_size()}; "
                "resume with the same number of processes (resharding is not supported)"
            )
        sharded = _sharded_dir(path)
        if not sharded.is_dir():
            raise FileNotFoundError(f"{path}: its sharded part {sharded.name} is missing")
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(sharded))  # in place, into this rank's shards
        dmp = self.model.dmp
        dmp.load_state_dict(state["model"])
        dmp.fused_optimizer.load_state_dict(state["fused_optim"])
        for opt, opt_state in zip(self.optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        checkpoint.set_rng_state(ckpt["rng"])
        for key in ("step", "epoch", "epoch_batches", "samples"):
            setattr(self.state, key, ckpt[key])
        log.info("resumed from %s (step %d, epoch %d)", path, self.state.step, self.state.epoch)
        return path

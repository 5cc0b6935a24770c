"""What `dlrm.train.run` does differently under several processes, in one place.

- `prepare`: join the process group, pick this rank's device (cuda:LOCAL_RANK), take rank 0's
  output dir, silence the progress bar off rank 0, refuse what cannot run distributed;
- `telemetry`: TensorBoard and results.json on rank 0 only (other ranks track their peak memory);
- `add_results`: world_size, global_batch_size, samples and samples/s over all ranks, per-rank
  peak memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from dlrm import checkpoint, distributed
from dlrm.config import ConfigError
from dlrm.telemetry import Telemetry, rss_bytes

log = logging.getLogger(__name__)


class RankTelemetry(Telemetry):
    """Telemetry for a rank other than 0: tracks this process's peak RSS, writes nothing."""

    def __init__(self, out_dir: Path) -> None:  # no SummaryWriter: no event file
        self.out_dir = Path(out_dir)
        self.peak_rss_bytes = rss_bytes()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        pass

    def write_results(self, results: dict) -> Path:
        return self.out_dir / "results.json"

    def close(self) -> None:
        pass


def prepare(cfg: DictConfig, device: torch.device, out_dir: Path) -> tuple[distributed.Env, torch.device, Path]:
    """Join the process group when WORLD_SIZE > 1 and return (env, this rank's device, the run's
    output dir: rank 0's). Raises ConfigError for what cannot run distributed."""
    env = distributed.init(device.type)
    if not env.distributed:
        resume = cfg.trainer.get("resume")
        if resume and any((checkpoint.run_dir_of(resume) / checkpoint.CHECKPOINT_DIR).glob("step-*.dcp")):
            raise ConfigError(
                f"trainer.resume={resume}: written by a torchrun run (sharded checkpoints); resume it "
                "under torchrun with the same number of processes"
            )
        return env, device, out_dir
    if cfg.emb.name == "cached":
        raise ConfigError(
            "emb=cached is single-process: its cache and host/disk store live in one process "
            "(run without torchrun, or use emb=full/hashed/qr/tt)"
        )
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    out_dir = Path(distributed.broadcast_object(str(out_dir)))
    if env.rank != 0:
        with open_dict(cfg):
            cfg.trainer.progress = False
    log.info("rank %d of %d, device %s, output dir %s", env.rank, env.world_size, device, out_dir)
    return env, device, out_dir


def telemetry(out_dir: Path) -> Telemetry:
    """Rank 0's Telemetry writes TensorBoard and results.json; other ranks' write nothing."""
    return Telemetry(out_dir) if distributed.is_main() else RankTelemetry(out_dir)


def add_results(results: dict, cfg: DictConfig, device: torch.device) -> dict:
    """`results` (this rank's) with the keys every run reports about its processes:

    world_size; global_batch_size = trainer.batch_size x world_size (samples per optimizer step
    over all ranks); samples (over all ranks); samples_per_s (sum of the ranks' rates);
    peak_rss_bytes_per_rank (and device_peak_bytes_per_rank on CUDA), gathered from every rank.
    Single-process runs get world_size 1 and the same values they always had."""
    world = distributed.world_size()
    out = dict(results, world_size=world, global_batch_size=int(cfg.trainer.batch_size) * world)
    if world == 1:
        return out
    mine = {"samples": results["samples"], "samples_per_s": results["samples_per_s"],
            "peak_rss_bytes": results["peak_rss_bytes"], "device_peak_bytes": results.get("device_peak_bytes")}
    ranks = distributed.gather_object(mine)
    out["samples"] = sum(r["samples"] for r in ranks)
    out["samples_per_s"] = sum(r["samples_per_s"] for r in ranks)
    out["peak_rss_bytes_per_rank"] = [r["peak_rss_bytes"] for r in ranks]
    out["peak_rss_bytes"] = max(out["peak_rss_bytes_per_rank"])
    if device.type == "cuda":
        out["device_peak_bytes_per_rank"] = [r["device_peak_bytes"] for r in ranks]
    return out

"""What torchrec's DistributedModelParallel costs: the training step plain, wrapped by DMP in a
process group of one, and under torchrun with several processes (each with its own batch).

    python scripts/bench_distributed.py --mode plain            # build_model, no process group
    python scripts/bench_distributed.py --mode dmp              # same model in DMP, world size 1
    torchrun --standalone --nproc_per_node=2 scripts/bench_distributed.py --mode dmp

The step is the trainer's (forward, BCE, zero_grad, backward, optimizer steps) on held Zipf
batches (dlrm.bench.common.dlrm_batch) of Criteo Kaggle-shaped tables capped at `--max-rows`.
Prints one JSON line (rank 0): median step ms, samples/s over all ranks (global batch / step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from dlrm import distributed
from dlrm.bench.common import dlrm_batch, time_each
from dlrm.build import build_model, table_specs
from dlrm.data.schema import KAGGLE_CARDINALITIES, SPARSE
from dlrm.trainer import dense_optimizer

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["plain", "dmp"], default="plain")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-rows", type=int, default=200_000, help="cap on each table's rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (emb=..., trainer.batch_size=...)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["trainer.precision=fp32", *args.overrides])
    if args.mode == "dmp" and "WORLD_SIZE" not in os.environ:  # a process group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        torch.distributed.init_process_group("gloo")
    else:
        distributed.init("cpu")
    cardinalities = {f: min(c, args.max_rows) for f, c in zip(SPARSE, KAGGLE_CARDINALITIES)}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, cardinalities, torch.device("cpu"))
    if args.mode == "dmp":
        from dlrm.distributed.model import wrap

        model = wrap(model, cfg, torch.device("cpu"))
    optimizers = [dense_optimizer(model.dense_parameters(), cfg.optim.dense), *model.sparse_arch.optimizers()]
    tables = table_specs(cardinalities, cfg.emb.dim)
    rng = np.random.default_rng(distributed.rank())
    batches = [dlrm_batch(tables, cfg.trainer.batch_size, rng) for _ in range(args.batches)]

    def step(batch) -> None:
        dense, kjt, labels = batch
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()

    cpu = []

    def timed(batch) -> None:  # process CPU ms too: steadier than wall time on a shared machine
        c0 = time.process_time()
        step(batch)
        cpu.append((time.process_time() - c0) * 1e3)

    times = time_each(timed, batches, args.warmup)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    med = max(distributed.gather_object(statistics.median(times)))  # the slowest rank sets the pace
    result = {
        "mode": args.mode,
        "world_size": world,
        "threads_per_process": args.threads,
        "batch_per_rank": cfg.trainer.batch_size,
        "step_ms": round(med, 2),
        "step_cpu_ms": round(max(distributed.gather_object(statistics.median(cpu[args.warmup :]))), 2),
        "samples_per_s": round(world * cfg.trainer.batch_size / med * 1e3),
        "emb": cfg.emb.name,
    }
    if distributed.is_main():
        print(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()

"""What torchrec's DistributedModelParallel costs: the training step plain, wrapped by DMP in a
process group of one, and under torchrun with several processes (each with its own batch).

    python scripts/bench_distributed.py --mode plain            # build_model, no process group
    python scripts/bench_distributed.py --mode dmp              # same model in DMP, world size 1
    torchrun --standalone --nproc_per_node=2 scripts/bench_distributed.py --mode dmp --comm
    python scripts/bench_distributed.py --suite --rounds 2     # 1x1, 1x2 threads, 2x1 processes, alternating

The step is the trainer's (forward, BCE, zero_grad, backward, optimizer steps) on held Zipf
batches (dlrm.bench.common.dlrm_batch) of Criteo Kaggle-shaped tables capped at `--max-rows`.
Prints one JSON line (rank 0): median step ms, samples/s over all ranks (global batch / step).

`--comm` (under torchrun) adds the communication share of a step, two ways (`comm_share`):
`comm_inflight_ms`, per step, the time some gloo collective is in flight (torch.profiler's
`gloo:*` spans, run on gloo's threads, their union per step: includes waiting for the slower
rank); `comm_alone_ms`, the same step's collectives (recorded: torchrec's all-to-alls, DDP's
gradient all-reduce) replayed alone, back to back: the transfers' own cost.
`--suite` runs the three layouts at one global batch, alternating, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = str(ROOT / "conf")
# torch.distributed collectives torchrec calls from Python (DDP's all-reduce is C++: added apart).
COLLECTIVES = ["all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["plain", "dmp"], default="plain")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-rows", type=int, default=200_000, help="cap on each table's rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--comm", action="store_true", help="measure the communication share (torchrun, dmp)")
    p.add_argument("--suite", action="store_true", help="1x1, 1x2 threads, 2x1 processes, alternating")
    p.add_argument("--rounds", type=int, default=2, help="--suite: alternations")
    p.add_argument("--global-batch", type=int, default=4096, help="--suite: rows per optimizer step")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (emb=..., trainer.batch_size=...)")
    args = p.parse_args(argv)
    if args.suite:
        return suite(args)
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
    if args.comm:
        result.update(comm_share(step, batches[: args.warmup], model, med))
    if distributed.is_main():
        print(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (us), in ms."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def comm_share(step, batches: list, model, step_ms: float) -> dict:
    """The communication of one training `step` (a callable on a batch) under torchrun, ms:

    - `comm_inflight_ms`: per step (median over `batches`, profiled with torch.profiler), the
      union of the intervals in which some `gloo:*` collective is in flight on gloo's threads;
      includes the wait for the other rank, and overlaps compute (DDP's all-reduce runs during
      backward); `profiled_step_ms` is the step under the profiler.
    - `comm_alone_ms`: the collectives one step issued (recorded by wrapping torch.distributed's
      Python calls torchrec makes, plus one all-reduce of the gradients each DDP wrapper owns,
      in one bucket), replayed alone and blocking after a barrier: the transfers' own cost.
    The shares are these over the step (`step_ms`: the unprofiled median)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.profiler import ProfilerActivity, profile, record_function

    calls: list = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def recorder(name):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, recorder(name))
    try:
        step(batches[0])
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    ddp_numel = [  # DDP leaves out what DMP sharded (parameters_to_ignore)
        sum(p.numel() for n, p in m.module.named_parameters() if p.requires_grad and n not in m.parameters_to_ignore)
        for m in model.modules() if isinstance(m, DistributedDataParallel)
    ]
    replay = [(originals[name], args, dict(kwargs, async_op=False)) for name, args, kwargs in calls]
    replay += [(originals["all_reduce"], (torch.zeros(n),), {}) for n in ddp_numel if n]
    alone = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        for fn, args, kwargs in replay:
            fn(*args, **kwargs)
        alone.append((time.perf_counter() - t0) * 1e3)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            with record_function("bench_step"):
                step(batch)
    events = prof.events()
    steps = [(e.time_range.start, e.time_range.end) for e in events if e.name == "bench_step"]
    comms = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("gloo:")]
    inflight = [_union_ms([(max(a, s), min(b, t)) for a, b in comms if a < t and b > s]) for s, t in steps]
    inflight_ms = max(distributed.gather_object(statistics.median(inflight)))
    alone_ms = max(distributed.gather_object(statistics.median(alone)))
    profiled = max(distributed.gather_object(statistics.median([(t - s) / 1e3 for s, t in steps])))
    return {
        "comm_calls_per_step": len(replay),
        "comm_bytes_per_step": sum(_bytes(args, kwargs) for _, args, kwargs in replay),
        "comm_alone_ms": round(alone_ms, 2),
        "comm_alone_share": round(alone_ms / step_ms, 3),
        "comm_inflight_ms": round(inflight_ms, 2),
        "profiled_step_ms": round(profiled, 2),
        "comm_inflight_share": round(inflight_ms / profiled, 3),
    }


def _bytes(args, kwargs) -> int:
    """Bytes of the tensors a collective sends (its input: the last tensor argument)."""
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    return int(tensors[-1].numel() * tensors[-1].element_size()) if tensors else 0


def suite(args) -> dict:
    """1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread (torchrun, DMP, with
    `--comm`), all at `--global-batch` rows per step, alternating for `--rounds`: samples/s per
    layout (median over rounds), the scaling efficiency of 2 processes (their samples/s over twice
    one single-threaded process's) and the communication share. Prints one JSON line."""
    script = str(ROOT / "scripts" / "bench_distributed.py")
    common = ["--batches", str(args.batches), "--warmup", str(args.warmup), "--max-rows", str(args.max_rows)]
    g = args.global_batch
    layouts = {
        "1x1": [sys.executable, script, "--mode", "plain", "--threads", "1", *common, f"trainer.batch_size={g}"],
        "1x2": [sys.executable, script, "--mode", "plain", "--threads", "2", *common, f"trainer.batch_size={g}"],
        "2x1": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                "--mode", "dmp", "--threads", "1", "--comm", *common, f"trainer.batch_size={g // 2}"],
    }
    runs: dict[str, list[dict]] = {k: [] for k in layouts}
    for _ in range(args.rounds):
        for name, cmd in layouts.items():
            threads = "2" if name == "1x2" else "1"
            env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
            out = subprocess.run(cmd + list(args.overrides), env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]))
            print(name, json.dumps(runs[name][-1]), file=sys.stderr)
    med = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in runs.items()}
    result = {
        "global_batch": g,
        "samples_per_s": med,
        "step_ms": {k: [r["step_ms"] for r in v] for k, v in runs.items()},
        "speedup_1x2": round(med["1x2"] / med["1x1"], 2),
        "scaling_efficiency_2x1": round(med["2x1"] / (2 * med["1x1"]), 2),
        "comm_alone_share_2x1": [r["comm_alone_share"] for r in runs["2x1"]],
        "comm_inflight_share_2x1": [r["comm_inflight_share"] for r in runs["2x1"]],
        "runs": runs,
    }
    print(json.dumps(result))
    return result

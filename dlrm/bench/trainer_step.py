"""The trainer's own step on real batches: held in memory (loader idle) against a live loader,
or two configurations side by side (`--against`).

The model, optimizers, precision, `trainer.compile` and `Trainer.train_step` are what
`python -m dlrm.train` builds (same config, same overrides); the batches are the training
split's first ones, and the ParquetLoader that read them stays alive (its thread idle on a full
queue), as in a run.

    python scripts/bench_trainer_step.py                          # default config
    python scripts/bench_trainer_step.py --batches 80 emb=tt rank=32
    python scripts/bench_trainer_step.py --against "emb=tt rank=32"   # TT vs the default, interleaved

`--against` builds a second Trainer with the extra overrides and times both on the same held
batches, alternating A B B A per batch, so a shared machine's drift hits both alike (each step
then starts with the other model's data in the caches, which slows the faster model relatively
more: the ratio is a lower bound; the fifth session's MDE measured 1.24x so and 1.6-1.8x in separate runs); it prints
each one's median and minimum step, the ratio of the medians, and the voluntary context switches
per step (`ru_nvcsw`: hundreds per step mean OpenMP threads are put to sleep, docs/benchmarks.md),
the minor page faults per step (`ru_minflt`: thousands mean freed buffers went back to the OS,
dlrm/malloc.py; `DLRM_MALLOC=glibc` leaves glibc's defaults to compare) and the process CPU time per step (all threads; on a loaded machine the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from dlrm.bench.common import time_each
from dlrm.build import build_model
from dlrm.data.loader import ParquetLoader
from dlrm.data.schema import SPARSE
from dlrm.telemetry import Telemetry
from dlrm.train import dataset_path, resolve_device, set_threads
from dlrm.trainer import Trainer

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def median_ms(trainer: Trainer, batches, warmup: int) -> float:
    return statistics.median(time_each(trainer.train_step, batches, warmup))


def _trainer(overrides: list[str], train: ParquetLoader | None, tb: str):
    """(Trainer, its config, its loader) for `overrides`, as `python -m dlrm.train` builds them."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"data.root={Path('data').resolve()}", *overrides])
    device = resolve_device(cfg.trainer.device)
    set_threads(cfg.trainer.threads)  # first: the compile decision keys on the thread count
    if train is None:
        train = ParquetLoader(dataset_path(cfg.data), cfg.data.train_split, cfg.trainer.batch_size, seed=cfg.seed)
    model = build_model(cfg, {f: train.cardinalities[f] for f in SPARSE}, device, train.dense_width)
    return Trainer(cfg, model, train, train, Telemetry(Path(tb)), device), cfg, train


def side_by_side(trainers: dict[str, Trainer], held: list, warmup: int) -> dict:
    """Median/min step ms of each trainer on `held`, A B B A per batch, and nvcsw per step."""
    names = list(trainers)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    switches: dict[str, int] = {n: 0 for n in names}
    faults: dict[str, int] = {n: 0 for n in names}
    for i, batch in enumerate(held):
        for name in names if i % 2 == 0 else names[::-1]:
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            trainers[name].train_step(batch)
            dt = (time.perf_counter() - t0) * 1e3
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            if i >= warmup:
                times[name].append(dt)
                cpu[name].append((u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime) * 1e3)
                switches[name] += u1.ru_nvcsw - u0.ru_nvcsw
                faults[name] += u1.ru_minflt - u0.ru_minflt
    steps = len(held) - warmup
    out = {
        n: {
            "median_ms": statistics.median(t),
            "min_ms": min(t),
            "cpu_ms": statistics.median(cpu[n]),  # process CPU time: all threads, spinning included
            "nvcsw_per_step": switches[n] / steps,
            "minflt_per_step": faults[n] / steps,  # minor page faults (dlrm/malloc.py)
        }
        for n, t in times.items()
    }
    out["ratio_of_medians"] = out[names[1]]["median_ms"] / out[names[0]]["median_ms"]
    out["ratio_of_minima"] = out[names[1]]["min_ms"] / out[names[0]]["min_ms"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=80, help="batches per measurement")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of each median")
    p.add_argument("--against", help='extra overrides for a second trainer timed beside the first, e.g. "emb=tt rank=32"')
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m dlrm.train")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tb:
        trainer, cfg, train = _trainer(args.overrides, None, tb)
        threads = set_threads(cfg.trainer.threads)  # already set: read it back
        batches = train.epoch(0)
        held = [next(batches) for _ in range(args.batches)]  # the loader's queue then fills and it idles
        if args.against:
            other, _, _ = _trainer([*args.overrides, *shlex.split(args.against)], train, tb)
            base = " ".join(args.overrides) or "default"
            result = {"threads": threads, **side_by_side({base: trainer, args.against: other}, held, args.warmup)}
        else:
            time_each(trainer.train_step, held[: args.warmup])
            u0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            memory_ms = median_ms(trainer, held[args.warmup :], 0)
            result = {
                "threads": threads,
                "memory_ms": memory_ms,
                "minflt_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - u0) / (len(held) - args.warmup),
                "live_loader_ms": median_ms(trainer, (next(batches) for _ in range(args.batches)), args.warmup),
                "memory_again_ms": median_ms(trainer, held, args.warmup),  # same rows again: warmer caches
            }
    print(json.dumps(_rounded(result)))
    return result


def _rounded(x):
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return round(x, 3 if abs(x) < 10 else 1) if isinstance(x, float) else x


if __name__ == "__main__":
    main()

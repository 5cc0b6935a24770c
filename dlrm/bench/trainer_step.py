"""The trainer's own step on real batches: held in memory (loader idle) against a live loader.

Answers "does the loader thread slow the step?": the model, optimizers and `Trainer.train_step`
are what `python -m dlrm.train` builds (same config, same overrides), the batches are the
training split's first ones.

    python scripts/bench_trainer_step.py                          # default config
    python scripts/bench_trainer_step.py --batches 80 emb=tt rank=32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=80, help="batches per measurement")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of each median")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m dlrm.train")
    args = p.parse_args(argv)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"data.root={Path('data').resolve()}", *args.overrides])
    device = resolve_device(cfg.trainer.device)
    threads = set_threads(cfg.trainer.threads)
    train = ParquetLoader(dataset_path(cfg.data), cfg.data.train_split, cfg.trainer.batch_size, seed=cfg.seed)
    model = build_model(cfg, {f: train.cardinalities[f] for f in SPARSE}, device, train.dense_width)
    with tempfile.TemporaryDirectory() as tb:
        trainer = Trainer(cfg, model, train, train, Telemetry(Path(tb)), device)
        batches = train.epoch(0)
        held = [next(batches) for _ in range(args.batches)]  # the loader's queue then fills and it idles
        result = {
            "threads": threads,
            "memory_ms": median_ms(trainer, held, args.warmup),
            "live_loader_ms": median_ms(trainer, (next(batches) for _ in range(args.batches)), args.warmup),
            "memory_again_ms": median_ms(trainer, held, args.warmup),  # same rows again: warmer caches
        }
    result = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

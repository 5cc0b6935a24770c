"""`python -m dlrm.train`: compose config -> build data, model -> Trainer.fit -> results.json.

    python -m dlrm.train                          # full tables, built-in synthetic data
    python -m dlrm.train emb=tt rank=32           # TT-compressed tables
    python -m dlrm.train -m emb=hashed compression=4,16,64 seed=1,2,3

Returns the sweep metric (`trainer.metric`, eval AUC by default) for Hydra sweepers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dlrm import checkpoint
from dlrm.build import build_model
from dlrm.config import ConfigError, flatten, validate
from dlrm.data.loader import ParquetLoader
from dlrm.data.schema import SPARSE
from dlrm.data.synthetic import SyntheticSpec, ensure_dataset
from dlrm.embeddings import Runtime
from dlrm.embeddings.budget import BudgetUnreachable
from dlrm.io import atomic_write_text
from dlrm.model import resolve_precision
from dlrm.telemetry import RESULTS_FILE, Telemetry
from dlrm.trainer import Trainer

log = logging.getLogger("dlrm")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available")
    return torch.device(name)


def set_threads(requested: int) -> int:
    """Intra-op threads; 0 = all cores. Measured on 2 cores: 2 threads beat 1 end to end by 14%
    even though the loader thread competes with them (docs/benchmarks.md)."""
    threads = requested or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def dataset_path(data: DictConfig) -> Path:
    """The parquet dataset directory: generated (synthetic) or given (data.path)."""
    if data.name == "synthetic":
        spec = SyntheticSpec(
            rows=data.rows,
            eval_rows=data.eval_rows,
            max_cardinality=data.max_cardinality,
            seed=data.seed,
            zipf=data.zipf,
            click_rate=data.click_rate,
            row_group_rows=data.row_group_rows,
            multi_hot=dict(data.get("multi_hot") or {}),
            table_rows=dict(data.get("table_rows") or {}),
        )
        return ensure_dataset(spec, Path(data.root))
    path = Path(data.path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.path={path}: no such directory (preprocess Criteo text into it with "
            "python -m dlrm.data.preprocess; see docs/data.md)"
        )
    return path


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Everything `main` does, minus Hydra: usable from tests and notebooks."""
    t_start = time.time()
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    threads = set_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    resume = cfg.trainer.get("resume")
    # A disk store lives in its run's dir unless emb.path says otherwise; a resumed run reopens
    # the store of the run it continues (run_dir_of fails fast if there is nothing to resume).
    store_dir = Path(checkpoint.run_dir_of(resume) if resume else out_dir).resolve()
    path = dataset_path(cfg.data)
    runtime = Runtime(seed=cfg.seed, store_dir=store_dir, resuming=bool(resume), data_dir=path)
    loader_args = dict(
        batch_size=cfg.trainer.batch_size,
        max_rows=cfg.data.get("max_rows", 0),
        pin_memory=device.type == "cuda",
        workers=cfg.data.get("workers", 0),
    )
    train_data = ParquetLoader(
        path, cfg.data.train_split, seed=cfg.seed, shuffle=cfg.data.shuffle, **loader_args
    )
    eval_data = ParquetLoader(path, cfg.data.eval_split, shuffle=False, **loader_args)
    cardinalities = {f: train_data.cardinalities[f] for f in SPARSE}
    on_unreachable = cfg.emb.get("budget_unreachable", "fail")
    if on_unreachable not in ("fail", "record"):
        raise ConfigError(f"emb.budget_unreachable={on_unreachable!r}: choose one of ['fail', 'record']")
    try:
        model = build_model(cfg, cardinalities, device, train_data.dense_width, runtime)
    except BudgetUnreachable as e:
        if on_unreachable == "fail":
            raise
        return record_unreachable(cfg, e, out_dir, t_start)
    embeddings, precision = model.sparse_arch, resolve_precision(cfg.trainer.precision, device)
    tele = Telemetry(out_dir)
    tele.text("config", OmegaConf.to_yaml(cfg))
    tele.text("embeddings", embeddings.describe())
    log.info("embeddings:\n%s", embeddings.describe())
    log.info(
        "device %s, %d threads, precision %s, data %s",
        device, threads, precision, path,
    )

    trainer = Trainer(cfg, model, train_data, eval_data, tele, device, out_dir / checkpoint.CHECKPOINT_DIR)
    if resume:
        trainer.resume(resume)
    metrics = trainer.fit()
    embeddings.flush(step=trainer.state.step)  # cached tables: write every cached row back to its store

    emb_bytes, full_bytes = embeddings.embedding_bytes(), embeddings.full_bytes()
    state = trainer.state
    tele.memory(state.step, emb_bytes, device)  # a last probe after the final eval
    results = {
        "backend": cfg.emb.name,
        "budget": cfg.emb.get("budget"),
        "model": cfg.model.name,
        **metrics,
        "steps": state.step,
        "samples": state.samples,
        **trainer.timing(),
        "embedding_bytes": emb_bytes,
        "full_embedding_bytes": full_bytes,
        "compression_ratio": full_bytes / emb_bytes,
        "peak_rss_bytes": tele.peak_rss_bytes,
        "wall_s": time.time() - t_start,
        **embeddings.stats(),
    }
    for key in ("teacher_auc", "teacher_logloss"):  # the loader already read meta.json
        if key in train_data.meta.extra:
            results[key] = train_data.meta.extra[key]
    if device.type == "cuda":
        results["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    tele.hparams(_hparams(cfg), {k: results[k] for k in ("auc", "logloss", "ne", "compression_ratio")})
    tele.write_results(results)
    tele.close()
    return results


def record_unreachable(cfg: DictConfig, e: BudgetUnreachable, out_dir: Path, t_start: float) -> dict:
    """emb.budget_unreachable=record: results.json says the cell is unreachable and why (no
    training), so a sweep's report shows it as such; the run then ends normally."""
    results = {
        "backend": cfg.emb.name,
        "budget": e.budget,
        "unreachable": True,
        "reason": str(e),
        "best_ratio": e.best,
        "wall_s": time.time() - t_start,
    }
    log.warning("%s: recorded as unreachable, not trained", e)
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def _hparams(cfg: DictConfig) -> dict:
    """The knobs a sweep varies, flattened for TensorBoard's HPARAMS tab."""
    flat = {"emb": cfg.emb.name, "seed": cfg.seed, "data": cfg.data.name}
    for group in ("emb", "optim", "trainer"):
        flat.update(flatten(OmegaConf.to_container(cfg[group], resolve=True), group))
    return flat


def summary(results: dict, out_dir: Path) -> str:
    mb = results["embedding_bytes"] / 2**20
    lines = [
        f"eval AUC {results['auc']:.4f}  logloss {results['logloss']:.4f}  NE {results['ne']:.4f}",
    ]
    if "teacher_auc" in results:
        lines[0] += f"   (teacher ceiling: AUC {results['teacher_auc']:.4f}, logloss {results['teacher_logloss']:.4f})"
    lines += [
        f"embeddings {mb:,.1f} MB, compression {results['compression_ratio']:.1f}x "
        "(vs fp32 tables + row-wise Adagrad state)",
        f"{results['samples_per_s']:,.0f} samples/s, median step {results['step_time_ms']:.1f} ms, "
        f"{results['steps']} steps in {results['wall_s']:.0f} s",
        f"results: {out_dir / 'results.json'}",
        f"TensorBoard: tensorboard --logdir {out_dir}",
    ]
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, out_dir)
    except Exception as e:
        if HydraConfig.get().mode.name == "MULTIRUN":
            # Into the job's log, where `dlrm.report` finds why the run failed; then let the
            # sweeper see the failure.
            log.exception("run failed: %s", e)
            raise
        # bad input and a full or unwritable disk (OSError) get one line; anything else is a bug
        if not isinstance(e, (ConfigError, OSError, ValueError, FloatingPointError)):
            raise  # a bug: keep the traceback
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)  # one clear line for bad input
        sys.exit(2)
    if results.get("unreachable"):
        print(f"not trained: {results['reason']} (recorded in {out_dir / 'results.json'})")
        return float("nan")
    print(summary(results, out_dir))
    return sweep_metric(results, cfg.trainer.metric)


def sweep_metric(results: dict, metric) -> float | tuple[float, ...]:
    """What the sweeper optimizes: one value, or a tuple for multi-objective search."""
    if isinstance(metric, str):
        return float(results[metric])
    return tuple(float(results[m]) for m in metric)


if __name__ == "__main__":
    main()

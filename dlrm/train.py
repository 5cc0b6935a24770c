"""`python -m dlrm.train`: compose config -> build data, model -> Trainer.fit -> results.json.

    python -m dlrm.train                          # full tables, built-in synthetic data
    python -m dlrm.train emb=tt rank=32           # TT-compressed tables
    python -m dlrm.train -m emb=hashed compression=4,16,64 seed=1,2,3

Returns the sweep metric (`trainer.metric`, eval AUC by default) for Hydra sweepers.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import shlex
import sys
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import dlrm
from dlrm import checkpoint, distributed
from dlrm.build import build_model
from dlrm.config import ConfigError, flatten, validate
from dlrm.data.checks import check_id_ranges
from dlrm.data.loader import ParquetLoader
from dlrm.data.schema import SPARSE
from dlrm.data.synthetic import SyntheticSpec, ensure_dataset
from dlrm.distributed import run as dist_run
from dlrm.embeddings import Runtime
from dlrm.embeddings.base import EmbeddingBackend
from dlrm.embeddings.budget import BudgetUnreachable
from dlrm.embeddings.policy import SplitEmbeddings
from dlrm.embeddings.tables import table_kernel
from dlrm.io import atomic_write_text
from dlrm.malloc import huge_pages_available
from dlrm.model import resolve_precision
from dlrm.overrides import check_group_choices, check_override_keys, check_overrides
from dlrm.telemetry import FILE_ONLY, RESULTS_FILE, route_library_logs
from dlrm.threads import warn_if_cores_busy
from dlrm.trainer import Interrupted, Trainer

log = logging.getLogger("dlrm")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available")
    return torch.device(name)


def set_threads(requested: int) -> int:
    """Intra-op threads; 0 = this process's share of the cores: all of them in a plain run, the
    cores divided by torchrun's `LOCAL_WORLD_SIZE` under torchrun (2 processes of 2 threads each
    on 2 cores oversubscribe them: a trial saw 354 ms steps). Measured on 2 cores:
    2 threads beat 1 end to end by 14% even though the loader thread competes with them
    (docs/benchmarks.md)."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = requested or max(1, dlrm.CPUS_AT_START // local_processes)
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


def compressed_tables(embeddings: torch.nn.Module, emb: DictConfig) -> int:
    """How many tables the chosen backend (`emb.name`) really took; the rest stayed `full`.

    A compressing backend that takes none (no table reaches `emb.min_rows`, e.g. with a small
    `data.max_cardinality`) trains plain full tables under its own name: warn, naming the key.
    Counted from the backend contract (`EmbeddingBackend.name` / `.tables`): the outermost
    modules of the chosen backend (a `cached` cache holds its store's backend, e.g. `tt`, inside)."""

    def ours_in(module: torch.nn.Module) -> int:
        if isinstance(module, EmbeddingBackend) and module.name == emb.name and not isinstance(module, SplitEmbeddings):
            return len(module.tables)
        return sum(ours_in(child) for child in module.children())

    ours = ours_in(embeddings)
    if emb.name != "full" and ours == 0:
        largest = max(t.rows for m in embeddings.modules() if isinstance(m, EmbeddingBackend) for t in m.tables)
        log.warning(
            "emb=%s compresses no table: none has emb.min_rows=%s rows or more (the largest has %d), "
            "so every table stays full; lower emb.min_rows or name tables in emb.tables",
            emb.name, emb.get("min_rows"), largest,
        )
    return ours if emb.name != "full" else 0


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Everything `main` does, minus Hydra: usable from tests and notebooks."""
    t_start = time.time()
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    # torchrun: join the process group; this rank's device; rank 0's out_dir (docs/distributed.md)
    env, device, out_dir = dist_run.prepare(cfg, device, out_dir)
    threads = set_threads(cfg.trainer.threads)
    if cfg.trainer.threads == 0 and not env.distributed:
        warn_if_cores_busy(threads)
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
        rank=env.rank,
        world_size=env.world_size,
    )
    train_data = ParquetLoader(
        path, cfg.data.train_split, seed=cfg.seed, shuffle=cfg.data.shuffle, **loader_args
    )
    eval_data = ParquetLoader(path, cfg.data.eval_split, shuffle=False, pad=True, **loader_args)
    # An id outside its table would surface only at the final eval, after the whole run.
    unfolded = {f: n for f, n in eval_data.meta.cardinalities.items() if f not in eval_data.max_rows}
    check_id_ranges(eval_data.files, unfolded, cfg.data.eval_split)
    cardinalities = {f: train_data.cardinalities[f] for f in SPARSE}
    if resume and not env.distributed:  # a checkpoint of other settings fails now, not after the build
        checkpoint.precheck(resume, OmegaConf.to_container(cfg, resolve=True), train_data.meta, train_data.path)
    if not resume:  # the first batches are read while the tables are initialized
        train_data.start(0)
    try:
        model = build_model(cfg, cardinalities, device, train_data.dense_width, runtime)
    except BudgetUnreachable as e:
        train_data.stop()
        if cfg.emb.budget_unreachable == "fail":
            raise
        return record_unreachable(cfg, e, out_dir, t_start)
    except BaseException:
        train_data.stop()
        raise
    # DLRM's dot interaction and MLP ReLUs: our C kernels or PyTorch ops (model.kernel; DCNv2 has none)
    interaction = getattr(getattr(model, "inter_arch", None), "kernel", None)
    mlp = getattr(model, "mlp_kernel", None)
    if env.distributed:
        from dlrm.distributed.model import wrap  # torchrec's DMP: only under torchrun

        model = wrap(model, cfg, device)
    embeddings, precision = model.sparse_arch, resolve_precision(cfg.trainer.precision, device)
    n_compressed = compressed_tables(embeddings, cfg.emb)
    tele = dist_run.telemetry(out_dir)  # rank 0 writes, other ranks only measure
    tele.text("config", OmegaConf.to_yaml(cfg))
    tele.text("embeddings", embeddings.describe())
    log.info("embeddings:\n%s", embeddings.describe())
    kernel = table_kernel(cfg.optim.sparse, device)
    # our PyTorch-ops kernel's rows on transparent huge pages (dlrm/malloc.py, table_kernel.py: not
    # for the C kernel, which prefetches); fbgemm allocates its own
    huge_pages = not env.distributed and kernel == "torch" and device.type == "cpu" and huge_pages_available()
    log.info(
        "device %s, %d thread%s, precision %s, table kernel %s (optim.sparse.kernel=%s%s), %sdata %s",
        device, threads, "" if threads == 1 else "s", precision,
        # under torchrun, sharded tables run in torchrec's fbgemm collection whatever the kernel
        "fbgemm (torchrec, sharded)" if env.distributed else kernel,
        cfg.optim.sparse.get("kernel", "auto"), ", rows on huge pages" if huge_pages else "",
        f"interaction kernel {interaction}, MLP ReLU kernel {mlp} (model.kernel={cfg.model.get('kernel', 'auto')}), "
        if interaction else "",
        path,
    )

    trainer_cls = Trainer
    if env.distributed:  # checkpoints through torch.distributed.checkpoint
        from dlrm.distributed.checkpoint import DistributedTrainer as trainer_cls
    trainer = trainer_cls(cfg, model, train_data, eval_data, tele, device, out_dir / checkpoint.CHECKPOINT_DIR)
    if resume:
        trainer.resume(resume)
    start_step = trainer.state.step  # > 0 when resumed
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
        **({"resumed_from_step": start_step} if resume else {}),
        "samples": state.samples,
        **trainer.timing(),
        "embedding_bytes": emb_bytes,
        "full_embedding_bytes": full_bytes,
        "compression_ratio": full_bytes / emb_bytes,
        "peak_rss_bytes": tele.peak_rss_bytes,
        "compressed_tables": n_compressed,
        "huge_pages": huge_pages,  # an environment setting (DLRM_HUGE_PAGES), not in the config
        # what auto resolved to (precision; C kernels or PyTorch ops): the step time depends on it
        "precision": precision,
        "table_kernel": "fbgemm (torchrec, sharded)" if env.distributed else kernel,
        **({"interaction_kernel": interaction, "mlp_kernel": mlp} if interaction else {}),
        "wall_s": time.time() - t_start,
        **embeddings.stats(),
    }
    for key in ("teacher_auc", "teacher_logloss"):  # the loader already read meta.json
        if key in train_data.meta.extra:
            results[key] = train_data.meta.extra[key]
    if device.type == "cuda":
        results["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    results = dist_run.add_results(results, cfg, device)  # world_size, global_batch_size, ...
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
    auc = results["auc"]
    auc_text = f"{auc:.4f}" if auc == auc else "undefined (one class in the eval split)"
    lines = [
        f"eval AUC {auc_text}  logloss {results['logloss']:.4f}  NE {results['ne']:.4f}",
    ]
    if "teacher_auc" in results:
        lines[0] += f"   (teacher ceiling: AUC {results['teacher_auc']:.4f}, logloss {results['teacher_logloss']:.4f})"
    steps = f"{results['steps']} steps"
    if "resumed_from_step" in results:  # this process trained only the steps after the checkpoint
        start = results["resumed_from_step"]
        steps = f"steps {start + 1}-{results['steps']} (resumed at {start})"
    lines += [
        f"embeddings {mb:,.1f} MB, compression {results['compression_ratio']:.1f}x "
        "(vs fp32 tables + row-wise Adagrad state)",
        f"{results['samples_per_s']:,.0f} samples/s, median step {results['step_time_ms']:.1f} ms, "
        f"{steps}, {results['wall_s']:.0f} s in all (start-up and evals included)",
        f"results: {out_dir / 'results.json'}",
        f"TensorBoard: tensorboard --logdir {out_dir}",
    ]
    return "\n".join(lines)


class UndefinedMetric(ValueError):
    """The sweep metric is NaN (an AUC over one class): the sweeper must see a failed trial.
    (Optuna's sweeper cannot record a NaN objective: its tell() fails on it and aborts the sweep;
    an exception makes the trial FAIL and the search go on.)"""


def _resume_command(out_dir: Path) -> str:
    """The command line that continues this run: the user's overrides + trainer.resume."""
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("trainer.resume=")]
    except ValueError:  # not under Hydra
        overrides = []
    return shlex.join(["python", "-m", "dlrm.train", *overrides, f"trainer.resume={out_dir}"])


def _requeued_resume(cfg: DictConfig, out_dir: Path) -> None:
    """A submitit job requeued after preemption runs again in its own output dir: continue from
    the checkpoint its first attempt wrote there (docs/sweeps.md, "Preemption")."""
    if cfg.trainer.get("resume") or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    if checkpoint.checkpoint_files(out_dir / checkpoint.CHECKPOINT_DIR):
        log.warning("requeued job: resuming from the checkpoints in %s", out_dir)
        with open_dict(cfg):
            cfg.trainer.resume = str(out_dir)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    route_library_logs()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        _requeued_resume(cfg, out_dir)
        results = run(cfg, out_dir)
        value = float("nan") if results.get("unreachable") else sweep_metric(results, cfg.trainer.metric)
    except Interrupted as e:  # (the trainer logged it; the console gets how to continue)
        print(f"{e}\nresume with: {_resume_command(out_dir)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints instead)
        print("interrupted (SIGINT) before or after training: nothing to checkpoint", file=sys.stderr)
        sys.exit(130)
    except UndefinedMetric as e:
        print(summary(results, out_dir))
        if multirun:
            log.error("%s", e)
            raise  # the sweeper records a failed trial; results.json (auc: null) stays
        log.warning("%s", e)
        return float("nan")
    except Exception as e:
        if multirun:
            # Into the job's log, where `dlrm.report` finds why the run failed; then let the
            # sweeper see the failure.
            log.exception("run failed: %s", e)
            raise
        # bad input and a full or unwritable disk (OSError) get one line; anything else is a bug
        if not isinstance(e, (ConfigError, OSError, ValueError, FloatingPointError)):
            raise  # a bug: keep the traceback
        log.error("%s", e, extra=FILE_ONLY)  # the console gets it once, on stderr:
        # one clear line for bad input, in one write: under torchrun every rank prints it, and two
        # processes' separate writes of the text and its newline could join two lines into one
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        sys.exit(2)
    if results.get("unreachable"):
        print(f"not trained: {results['reason']} (recorded in {out_dir / 'results.json'})")
    elif distributed.is_main():
        print(summary(results, out_dir))
    distributed.shutdown()
    return value


def sweep_metric(results: dict, metric) -> float | tuple[float, ...]:
    """What the sweeper optimizes: one value, or a tuple for multi-objective search.

    Raises UndefinedMetric when a value is NaN (an AUC over an eval split with one class)."""
    names = [metric] if isinstance(metric, str) else list(metric)
    values = tuple(float(results[m]) if results[m] is not None else float("nan") for m in names)
    undefined = [m for m, v in zip(names, values) if v != v]
    if undefined:
        raise UndefinedMetric(
            f"trainer.metric {undefined} undefined (null in results.json): the eval split has one class"
        )
    return values[0] if isinstance(metric, str) else values


def main() -> None:
    """`python -m dlrm.train`: the overrides are checked first, then Hydra runs `_hydra_main`."""
    error = check_overrides(sys.argv[1:]) or check_group_choices(sys.argv[1:]) or check_override_keys(sys.argv[1:])
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    _hydra_main()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End the process once everything is written, skipping the interpreter's teardown.

    With torch, torchrec, fbgemm and dynamo loaded, Python's module teardown took 1-2 s after the
    last line of a run (`python -c "import dlrm.train"` exits in 1.1-2.0 s, in 0.06 s this way):
    a second of every run and every sweep job. Everything a normal exit does before that teardown
    still runs, in its order: threading's exit hooks and the join of non-daemon threads (e.g.
    joblib's executor telling its sweep workers to stop: without it the multirun waited for
    them forever), then the atexit handlers (logging's flush, cached tables' write-back,
    multiprocessing's reaping of child processes); then stdio is flushed and the process ends
    with status 0.
    """
    threading._shutdown()  # what Python's exit runs first (private, in every CPython 3)
    atexit._run_exitfuncs()  # then the registered handlers, in order
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    distributed.patch_argv()  # under torchrun: ranks other than 0 write no Hydra files or logs
    main()

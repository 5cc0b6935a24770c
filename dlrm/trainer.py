"""The training loop: batches -> model -> BCE loss -> optimizers, with evaluation and telemetry.

Three kinds of optimizer step each batch:
- the dense optimizer (Adam/Adagrad/SGD) over the MLPs,
- the embedding backend's own optimizers (e.g. TT cores), from `backend.optimizers()`,
- fused table updates, which fbgemm already applied inside backward.

With `trainer.checkpoint_every`, the trainer saves its whole state every that many steps and at
the end (dlrm/checkpoint.py); `resume()` loads one and `fit()` continues from its batch.

Signals (cluster preemption, Ctrl-C): the first SIGTERM or SIGINT during `fit()` lets the current
step finish, writes a checkpoint (also with checkpoint_every=0) and raises `Interrupted`; a second
one exits at once. Under submitit (`hydra/launcher=slurm`) its preemption signal (SIGUSR2) does
the same and then hands over to submitit, which requeues the job (docs/sweeps.md).

Evaluation: every `eval_every` steps on the first `periodic_eval_batches` eval batches (a cheap
point for TensorBoard's eval/ curves), and at the end on the whole split (or `eval_batches`).

Step time is measured from "batch in hand" to "optimizers stepped" (the loader runs ahead in its
own thread); samples/s is end to end over the timed steps, data loading included.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dlrm import checkpoint
from dlrm import compile as compile_step
from dlrm.data.loader import ParquetLoader
from dlrm.embeddings.base import EmbeddingBackend
from dlrm.embeddings.tables import (
    load_portable_tables,
    portable_tables,
    table_kernel,
    table_layout,
    with_own_table_buffers,
)
from dlrm.malloc import keep_freed_memory
from dlrm.metrics import EvalMetrics
from dlrm.model import DLRM
from dlrm.telemetry import Telemetry

log = logging.getLogger(__name__)

DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def dense_optimizer(params: list, cfg: DictConfig) -> torch.optim.Optimizer:
    """The MLPs' optimizer, fused (one kernel over all parameters instead of a dozen ops per
    tensor: docs/benchmarks.md, "Where our step got faster"); same update as unfused."""
    if cfg.name not in DENSE_OPTIMIZERS:
        raise ValueError(f"optim.dense.name={cfg.name!r}: choose one of {sorted(DENSE_OPTIMIZERS)}")
    return DENSE_OPTIMIZERS[cfg.name](params, lr=cfg.lr, fused=True)


class Interrupted(Exception):
    """Training stopped by a signal after a whole step, with a checkpoint of that step.

    `exit_code` is the shell's convention for death by that signal (128 + signal number: 143 for
    SIGTERM, 130 for SIGINT), so schedulers and scripts see an interrupted run as one."""

    def __init__(self, signum: int, step: int, max_steps: int, path: Path) -> None:
        self.signal_name = signal.Signals(signum).name
        self.step, self.path, self.exit_code = step, path, 128 + signum
        super().__init__(f"interrupted by {self.signal_name} after step {step} of {max_steps}; checkpoint {path}")


def preemption_signals() -> list[int]:
    """SIGTERM and SIGINT, plus submitit's preemption signal when running as a submitit job
    (SUBMITIT_PREEMPT_SIGNAL, USR2 by default: what submitit asks SLURM to send before a kill)."""
    sigs = [signal.SIGTERM, signal.SIGINT]
    if os.environ.get("SUBMITIT_EXECUTOR"):
        sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if sig is not None and sig not in sigs:
            sigs.append(sig)
    return sigs


class StopOnSignal:
    """Context manager: the first signal sets `signum` (the loop stops after its step); a second
    one restores the default action and re-raises the signal: the process exits at once.

    Only in the main thread (Python delivers signals there; elsewhere this does nothing)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in preemption_signals():
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.warning(
            "%s: finishing the current step, then writing a checkpoint (send it again to exit at once)",
            signal.Signals(signum).name,
        )

    def hand_over(self) -> None:
        """Call the handler that was installed before ours for the signal received (submitit's
        checkpoint-and-requeue for its preemption signal; it may exit the process)."""
        prev = self.previous.get(self.signum)
        if callable(prev) and prev is not signal.default_int_handler:
            self.__exit__()
            prev(self.signum, None)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    epoch_batches: int = 0  # batches of the current epoch already trained on (resume skips them)
    samples: int = 0
    step_times: list[float] = field(default_factory=list)  # seconds, after warm-up
    timed_samples: int = 0
    timed_wall: float = 0.0
    last_loss: float = float("nan")


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        model: DLRM,
        train_data: ParquetLoader,
        eval_data: ParquetLoader,
        telemetry: Telemetry,
        device: torch.device,
        checkpoint_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg.trainer
        self.run_config = OmegaConf.to_container(cfg, resolve=True)  # saved with checkpoints
        keep_freed_memory()  # each step's buffers stay mapped: no page faults per step (malloc.py)
        self.model = model.to(device)
        self.train_data, self.eval_data = train_data, eval_data
        self.tele = telemetry
        self.device = device
        self.table_kernel = table_layout(table_kernel(cfg.optim.sparse, device))  # whose layout checkpoints hold
        self.dense_params = model.dense_parameters()
        self.optimizers = [dense_optimizer(self.dense_params, cfg.optim.dense)]
        self.optimizers += model.sparse_arch.optimizers()
        self.graph = compile_step.graph_fingerprint(model, self.cfg.batch_size)
        self.compile_pending = compile_step.should_compile(
            self.cfg.get("compile", False), self.cfg.max_steps, device, self.graph
        ) and compile_step.enable(model)
        value = self.cfg.get("compile", False)  # YAML gives true/false as booleans: shown as typed
        log.info("trainer.compile=%s: the dense step runs %s", str(value).lower() if isinstance(value, bool) else value,
                 "compiled (the first step compiles or loads it)" if self.compile_pending else "eager")
        self.state = TrainState()
        self.eval_split = str(cfg.data.get("eval_split", "eval"))
        self._warned_single_class = False
        self._periodic_batches: list | None = None  # the capped mid-training evals' batches, read once
        self._saved_step = -1  # step of the last checkpoint written by this process
        self.stop_dir = checkpoint_dir  # where a signalled run writes its checkpoint
        self.checkpoint_dir = checkpoint_dir if self.cfg.get("checkpoint_every", 0) else None
        if self.checkpoint_dir is not None:
            # The last checkpoint, not an exit flush, is where a crashed run resumes from.
            for m in model.modules():
                if isinstance(m, EmbeddingBackend):
                    m.flush_at_exit = False

    def fit(self) -> dict[str, float]:
        """Train for `trainer.max_steps` steps, evaluating every `eval_every`; final eval metrics.

        Raises `Interrupted` after a checkpoint when SIGTERM/SIGINT arrives (module docstring)."""
        with StopOnSignal() as stop:
            self._stop = stop
            return self._fit()

    def _fit(self) -> dict[str, float]:
        cfg, state = self.cfg, self.state
        bar = tqdm(
            total=cfg.max_steps, initial=state.step, disable=not cfg.progress, unit="step", dynamic_ncols=True
        )
        self.model.train()
        timed_from = None
        # The timed wall clock runs from the first step after warm-up, minus the evals and
        # checkpoints inside that window; a resumed run adds its window to the one saved.
        wall_before, paused = state.timed_wall, 0.0
        first_step = state.step  # > 0 when resumed: warm-up counts from here
        # A run shorter than its warm-up still times its second half, so results.json never
        # holds NaN step times (not valid JSON for strict readers).
        warmup = min(cfg.warmup_steps, (cfg.max_steps - first_step) // 2)
        every = cfg.get("checkpoint_every", 0)
        log.info("training steps %d..%d", state.step + 1, cfg.max_steps)
        while state.step < cfg.max_steps:
            # A resumed run skips the batches its checkpoint already trained on.
            for batch in itertools.islice(self.train_data.epoch(state.epoch), state.epoch_batches, None):
                t0 = time.perf_counter()
                loss = self.train_step(batch)
                t1 = time.perf_counter()
                state.step += 1
                state.epoch_batches += 1
                state.samples += len(batch)
                if state.step - first_step > warmup:
                    if timed_from is None:  # end-to-end clock starts after warm-up
                        timed_from = t0
                    state.step_times.append(t1 - t0)
                    state.timed_samples += len(batch)
                    state.timed_wall = wall_before + (t1 - timed_from - paused)
                self._log_train(state, loss, t1 - t0, len(batch), bar)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
                    t_eval = time.perf_counter()
                    self.evaluate(periodic=True)
                    self.model.train()
                    if timed_from is not None:
                        paused += time.perf_counter() - t_eval
                if self.checkpoint_dir is not None and state.step % every == 0:
                    t_save = time.perf_counter()
                    self.save_checkpoint()
                    if timed_from is not None:
                        paused += time.perf_counter() - t_save
                if self._stop.signum is not None:
                    self._interrupt()
                if state.step >= cfg.max_steps:
                    break
            else:
                state.epoch += 1
                state.epoch_batches = 0
                if state.epoch == 1 and state.step < cfg.max_steps:
                    log.warning(
                        "epoch 2 starts at step %d of %d: CTR models overfit sharply once rows repeat "
                        "(eval logloss can get worse than at the end of epoch 1); consider more "
                        "data rows or fewer steps",
                        state.step, cfg.max_steps,
                    )
        bar.close()
        if self.checkpoint_dir is not None and state.step % every:
            self.save_checkpoint()  # the final state, so a longer run can continue from it
        if self._stop.signum is not None:  # arrived during the last step or checkpoint
            self._interrupt()
        return self.evaluate()

    def _interrupt(self) -> None:
        """Checkpoint the step just finished (unless already saved), then raise `Interrupted`."""
        stop, state = self._stop, self.state
        if self.stop_dir is None:
            raise RuntimeError("Trainer was built without a checkpoint dir: cannot save on a signal")
        path = self.save_checkpoint(self.stop_dir) if self._saved_step != state.step else None
        path = path or checkpoint.checkpoint_files(self.stop_dir)[state.step]
        for m in self.model.modules():  # the checkpoint, not an exit flush, is the resume point
            if isinstance(m, EmbeddingBackend):
                m.flush_at_exit = False
        self.tele.writer.flush()
        log.warning("stopped by %s after step %d: checkpoint %s", signal.Signals(stop.signum).name, state.step, path)
        stop.hand_over()  # submitit: requeue this job (exits); otherwise a no-op
        raise Interrupted(stop.signum, state.step, self.cfg.max_steps, path)

    def save_checkpoint(self, directory: Path | None = None) -> Path:
        """The whole training state as checkpoints/step-N.pt (in `directory`, default the periodic
        checkpoint dir); then the embeddings' external store (if any) is committed at the same
        step (order: see dlrm/checkpoint.py)."""
        s, backend = self.state, self.model.sparse_arch
        t0 = time.perf_counter()
        payload = {
            "step": s.step,
            "epoch": s.epoch,
            "epoch_batches": s.epoch_batches,
            "samples": s.samples,
            "dense": {k: v for k, v in self.model.state_dict().items() if not k.startswith("sparse_arch.")},
            "embeddings": backend.checkpoint_state(),
            "tables": portable_tables(backend),  # views of the above: a resume under the other kernel
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "rng": checkpoint.rng_state(),
            "config": self.run_config,
            "dataset": checkpoint.dataset_identity(self.train_data.meta),
            "table_kernel": self.table_kernel,
        }
        directory = directory or self.checkpoint_dir
        path = checkpoint.save(directory, s.step, payload)
        backend.flush(step=s.step)
        checkpoint.prune(directory)
        self._saved_step = s.step
        log.info("checkpoint %s (%.2f GB, %.1f s)", path, path.stat().st_size / 1e9, time.perf_counter() - t0)
        return path

    def resume(self, source: str | Path) -> Path:
        """Load the checkpoint `trainer.resume` points at; `fit()` then continues from it."""
        backend = self.model.sparse_arch
        path = checkpoint.find(source, backend.committed_step())
        ckpt = checkpoint.load(path)
        checkpoint.check_config(ckpt["config"], self.run_config, path)
        # Another table kernel (auto: ours on CPU, fbgemm's on CUDA) loads the per-table copy.
        convert = ckpt.get("table_kernel") not in (None, self.table_kernel)
        if convert and "tables" not in ckpt:  # written before checkpoints held it
            checkpoint.check_table_kernel(ckpt.get("table_kernel"), self.table_kernel, path)
        checkpoint.check_dataset(
            ckpt.get("dataset"), checkpoint.dataset_identity(self.train_data.meta), path, self.train_data.path
        )
        missing, unexpected = self.model.load_state_dict(ckpt["dense"], strict=False)
        missing = [k for k in missing if not k.startswith("sparse_arch.")]
        if missing or unexpected:
            raise ValueError(f"{path}: dense model does not match (missing {missing}, unexpected {unexpected})")
        if convert:
            module = with_own_table_buffers(backend, ckpt["embeddings"]["module"])
            backend.load_checkpoint_state({**ckpt["embeddings"], "module": module})
            load_portable_tables(backend, ckpt["tables"])
            log.info("tables converted from the %s kernel's layout to the %s kernel's", ckpt["table_kernel"], self.table_kernel)
        else:
            backend.load_checkpoint_state(ckpt["embeddings"])
        for opt, state in zip(self.optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(state)
        checkpoint.set_rng_state(ckpt["rng"])
        for key in ("step", "epoch", "epoch_batches", "samples"):
            setattr(self.state, key, ckpt[key])
        log.info("resumed from %s (step %d, epoch %d)", path, self.state.step, self.state.epoch)
        return path

    def train_step(self, batch) -> torch.Tensor:
        if self.compile_pending:  # the first compiled step: fall back to eager if compiling fails
            self.compile_pending = False
            try:
                loss = self._step(batch)
                compile_step.mark_compiled(self.graph)
                return loss
            except FloatingPointError:
                raise
            except Exception as e:  # noqa: BLE001 - inductor/dynamo raise many kinds; all mean "no compile"
                compile_step.disable(self.model, e)
        return self._step(batch)

    def _step(self, batch) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        logits = self.model(batch.dense, batch.sparse)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.state.step + 1}: lower the learning "
                "rates or set trainer.grad_clip"
            )
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()  # fused table updates happen here
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so step time is the real GPU time
        return loss.detach()

    def _log_train(self, state: TrainState, loss: torch.Tensor, dt: float, n: int, bar) -> None:
        state.last_loss = float(loss)
        bar.update(1)
        if state.step % self.cfg.log_every and state.step != 1:
            return
        rate = state.timed_samples / state.timed_wall if state.timed_wall else n / dt
        bar.set_postfix(loss=f"{state.last_loss:.4f}", samples_s=f"{rate:,.0f}")
        self.tele.scalars(
            state.step,
            {"train/loss": state.last_loss, "train/step_time_ms": dt * 1e3, "train/samples_per_s": rate},
        )
        backend = self.model.sparse_arch
        self.tele.memory(state.step, backend.embedding_bytes(), self.device)
        self.tele.scalars(state.step, {f"emb/{k}": v for k, v in backend.stats().items()})

    def eval_cap(self, periodic: bool) -> int:
        """Eval batches to read (0 = the whole split): `eval_batches` caps every eval, and
        `periodic_eval_batches` also caps the mid-training ones."""
        caps = [self.cfg.eval_batches] + ([self.cfg.get("periodic_eval_batches", 0)] if periodic else [])
        caps = [c for c in caps if c]
        return min(caps) if caps else 0

    def _eval_batches(self, periodic: bool, cap: int):
        """The eval split's batches, the first `cap` of them (0: all). A capped periodic eval reads
        the same unshuffled batches every time, so they are read once and held (`cap` batches in
        memory: 11 MB at the defaults) instead of decoding the split's first row groups again at
        each eval (0.1-0.2 s of a 0.25 s periodic eval, docs/benchmarks.md)."""
        if not (periodic and cap):
            return itertools.islice(self.eval_data.epoch(0), cap or None)
        if self._periodic_batches is None:
            self._periodic_batches = list(itertools.islice(self.eval_data.epoch(0), cap))
        return self._periodic_batches

    @torch.no_grad()
    def evaluate(self, periodic: bool = False) -> dict[str, float]:
        """AUC, logloss and NE on the eval split (capped: `eval_cap`); AUC is NaN, with one
        warning naming the split, when the labels read hold one class."""
        t0 = time.perf_counter()
        self.model.eval()
        metrics = EvalMetrics()
        cap = self.eval_cap(periodic)
        for batch in self._eval_batches(periodic, cap):
            batch = batch.to(self.device, non_blocking=True)
            metrics.update(self.model(batch.dense, batch.sparse), batch.labels)
        result = metrics.compute()
        if metrics.single_class and not self._warned_single_class:
            self._warned_single_class = True
            read = f"the first {cap} batches of eval split" if cap else "eval split"
            log.warning(
                "%s %r (data.eval_split) holds only label %d in %d rows: AUC is undefined "
                "(null in results.json); evaluate on a split with clicks and non-clicks",
                read, self.eval_split, int(metrics.pos > 0), metrics.n,
            )
        finite = {f"eval/{k}": v for k, v in result.items() if v == v}  # an undefined AUC is no point
        self.tele.scalars(self.state.step, finite)
        log.info(
            "step %d eval (%s, %.1f s): %s",
            self.state.step, f"{cap} batches" if cap else "whole split", time.perf_counter() - t0, result,
        )
        return result

    def timing(self) -> dict[str, float]:
        """Median step time (warm-up excluded) and end-to-end samples/s over the timed steps."""
        s = self.state
        return {
            "step_time_ms": statistics.median(s.step_times) * 1e3 if s.step_times else float("nan"),
            "samples_per_s": s.timed_samples / s.timed_wall if s.timed_wall else float("nan"),
        }

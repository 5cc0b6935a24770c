"""The training loop: batches -> model -> BCE loss -> optimizers, with evaluation and telemetry.

Three kinds of optimizer step each batch:
- the dense optimizer (Adam/Adagrad/SGD) over the MLPs,
- the embedding backend's own optimizers (e.g. TT cores), from `backend.optimizers()`,
- fused table updates, which fbgemm already applied inside backward.

Step time is measured from "batch in hand" to "optimizers stepped" (the loader runs ahead in its
own thread); samples/s is end to end over the timed steps, data loading included.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from dlrm.data.loader import ParquetLoader
from dlrm.metrics import EvalMetrics
from dlrm.model import DLRM
from dlrm.telemetry import Telemetry

log = logging.getLogger(__name__)

DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def dense_optimizer(params: list, cfg: DictConfig) -> torch.optim.Optimizer:
    if cfg.name not in DENSE_OPTIMIZERS:
        raise ValueError(f"optim.dense.name={cfg.name!r}: choose one of {sorted(DENSE_OPTIMIZERS)}")
    return DENSE_OPTIMIZERS[cfg.name](params, lr=cfg.lr)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    step_times: list[float] = field(default_factory=list)  # seconds, after warm-up
    timed_samples: int = 0
    timed_wall: float = 0.0
    paused: float = 0.0  # seconds spent in mid-training evals, kept out of samples/s
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
    ) -> None:
        self.cfg = cfg.trainer
        self.model = model.to(device)
        self.train_data, self.eval_data = train_data, eval_data
        self.tele = telemetry
        self.device = device
        self.dense_params = model.dense_parameters()
        self.optimizers = [dense_optimizer(self.dense_params, cfg.optim.dense)]
        self.optimizers += model.sparse_arch.optimizers()
        self.state = TrainState()

    def fit(self) -> dict[str, float]:
        """Train for `trainer.max_steps` steps, evaluating every `eval_every`; final eval metrics."""
        cfg, state = self.cfg, self.state
        bar = tqdm(total=cfg.max_steps, disable=not cfg.progress, unit="step", dynamic_ncols=True)
        self.model.train()
        timed_from = None
        while state.step < cfg.max_steps:
            for batch in self.train_data.epoch(state.epoch):
                t0 = time.perf_counter()
                loss = self.train_step(batch)
                t1 = time.perf_counter()
                state.step += 1
                state.samples += len(batch)
                if state.step > cfg.warmup_steps:
                    if timed_from is None:  # end-to-end clock starts after warm-up
                        timed_from = t0
                    state.step_times.append(t1 - t0)
                    state.timed_samples += len(batch)
                    state.timed_wall = t1 - timed_from - state.paused
                self._log_train(state, loss, t1 - t0, len(batch), bar)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
                    t_eval = time.perf_counter()
                    self.evaluate()
                    self.model.train()
                    state.paused += time.perf_counter() - t_eval
                if state.step >= cfg.max_steps:
                    break
            else:
                state.epoch += 1
                if state.epoch == 1 and state.step < cfg.max_steps:
                    log.warning(
                        "epoch 2 starts at step %d of %d: CTR models overfit sharply once rows repeat "
                        "(eval logloss can get worse than at the end of epoch 1); consider more "
                        "data rows or fewer steps",
                        state.step, cfg.max_steps,
                    )
        bar.close()
        return self.evaluate()

    def train_step(self, batch) -> torch.Tensor:
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        metrics = EvalMetrics()
        for i, batch in enumerate(self.eval_data.epoch(0)):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            batch = batch.to(self.device, non_blocking=True)
            metrics.update(self.model(batch.dense, batch.sparse), batch.labels)
        result = metrics.compute()
        self.tele.scalars(self.state.step, {f"eval/{k}": v for k, v in result.items()})
        log.info("step %d eval: %s", self.state.step, result)
        return result

    def timing(self) -> dict[str, float]:
        """Median step time (warm-up excluded) and end-to-end samples/s over the timed steps."""
        s = self.state
        return {
            "step_time_ms": statistics.median(s.step_times) * 1e3 if s.step_times else float("nan"),
            "samples_per_s": s.timed_samples / s.timed_wall if s.timed_wall else float("nan"),
        }

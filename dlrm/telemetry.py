"""Telemetry: TensorBoard scalars, memory probes and results.json. It observes, never steers.

Tags are grouped by prefix (train/, eval/, memory/, emb/): see README.md for the list.

Example::

    tele = Telemetry(out_dir)
    tele.scalars(step, {"train/loss": 0.45})
    tele.memory(step, embedding_bytes=model.sparse_arch.embedding_bytes())
    tele.write_results({"auc": 0.79, ...})
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import psutil
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from dlrm.io import atomic_write_text

RESULTS_FILE = "results.json"
OUR_LOGGERS = ("dlrm", "__main__")


# `log.error(..., extra=FILE_ONLY)`: into the run's log file, not the console (for a message the
# console gets in another form, e.g. the one-line `error:` on stderr).
FILE_ONLY = {"console": False}


def route_library_logs() -> None:
    """Console: our log lines, and other libraries' only at ERROR and above; the run's log file
    (Hydra's `<run dir>/<job>.log`) keeps everything. fbgemm logs its TBE arguments and feature
    gates at INFO through the root logger, and torch prints an fx tracing warning before the
    first step through its own "torch" handler: chatter a user cannot act on.
    Call after Hydra configured logging (inside the task function)."""

    def ours(record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):  # FILE_ONLY: the console already has it
            return False
        return record.name.startswith(OUR_LOGGERS) or record.levelno >= logging.ERROR

    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(getattr(f, "__name__", "") == ours.__name__ for f in handler.filters):
                handler.addFilter(ours)
    torch_log = logging.getLogger("torch")  # torch prints through its own handler, not root's
    for handler in list(torch_log.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            torch_log.removeHandler(handler)
    torch_log.propagate = True


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return psutil.Process().memory_info().rss


class Telemetry:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.writer = SummaryWriter(log_dir=str(self.out_dir))
        # Peak RSS of *this run*, sampled at every memory probe. (The process-wide ru_maxrss would
        # carry earlier jobs' peaks into later ones when a sweep runs jobs in one process.)
        self.peak_rss_bytes = rss_bytes()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        # TensorBoard renders text as markdown; indent four spaces to keep it verbatim.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()))

    def memory(self, step: int, embedding_bytes: int, device: torch.device) -> None:
        rss = rss_bytes()
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        values = {"memory/rss_bytes": rss, "memory/embedding_bytes": embedding_bytes}
        if device.type == "cuda":
            values["memory/device_allocated_bytes"] = torch.cuda.memory_allocated(device)
            values["memory/device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        self.scalars(step, values)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """Log the run's knobs and final metrics for TensorBoard's HPARAMS tab, in this run's dir.

        (SummaryWriter.add_hparams would write them into a new timestamped sub-run instead.)
        """
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        finite = {f"hparam/{k}": v for k, v in metrics.items() if math.isfinite(v)}
        exp, ssi, sei = hparams_summary(clean, finite)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        self.scalars(0, finite)

    def write_results(self, results: dict) -> Path:
        """results.json, written to a temporary name and renamed: never half-written. A non-finite
        number (an undefined AUC) is written as null: NaN is not JSON, strict readers reject it."""
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in results.items()}
        text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n"
        return atomic_write_text(self.out_dir / RESULTS_FILE, text)

    def close(self) -> None:
        self.writer.close()

"""`trainer.compile`: torch.compile (inductor) of the dense part of the step, where it pays.

What is compiled is `DLRM.dense_forward` (bottom MLP, dot interaction, top MLP, under autocast)
and, through AOTAutograd, its backward; the embedding backend stays eager (fbgemm kernels and
fused updates). Evaluation runs eager, so no second (inference) graph is compiled.

- `true` / `false`: always / never.
- `auto`: compile on CPU when the run has at least `AUTO_MIN_STEPS` steps to go. Compiling costs
  its first step tens of seconds (cold) and saves a few ms per step; `AUTO_MIN_STEPS` is where
  that paid back in the measurements of docs/benchmarks.md ("torch.compile"), so a default
  1000-step run stays eager and never comes out behind. CUDA stays eager under `auto`: not
  measured.

Compiled artifacts are cached between runs (inductor's FX graph and AOTAutograd caches) in
`$TORCHINDUCTOR_CACHE_DIR`, by default `~/.cache/dlrm/inductor` (`$XDG_CACHE_HOME` respected), so
the runs of a sweep after the first compile in seconds. If compiling fails, the step falls back
to eager with one warning and the run goes on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", True, False)  # YAML/Hydra parse `true`/`false` as booleans
AUTO_MIN_STEPS = 5000


def cache_dir() -> Path:
    """Where inductor keeps compiled artifacts: `$TORCHINDUCTOR_CACHE_DIR` if set, else the user's
    cache (`$XDG_CACHE_HOME` or ~/.cache) / dlrm / inductor."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dlrm" / "inductor"


def should_compile(value, steps_to_go: int, device: torch.device) -> bool:
    """Resolve `trainer.compile` (auto | true | false) for a run with `steps_to_go` steps.

    Raises:
        ValueError: `value` is not one of auto, true, false (config.validate checks this first).
    """
    value = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    if value not in CHOICES or isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"trainer.compile={value!r}: choose one of auto, true, false")
    if value == "auto":
        return device.type == "cpu" and steps_to_go >= AUTO_MIN_STEPS
    return bool(value)


def enable(model) -> bool:
    """Compile `model.dense_forward` (lazily: the work happens at the first training step), with
    the inductor cache in `cache_dir()`. False, with one warning, for a model without one."""
    if not hasattr(model, "dense_forward"):
        log.warning("trainer.compile: %s has no dense_forward to compile; running eager", type(model).__name__)
        return False
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    model.compiled_dense_forward = torch.compile(model.dense_forward, dynamic=False)
    return True


def disable(model, error: BaseException) -> None:
    """The fallback: back to eager for the rest of the run, with one warning naming the error."""
    model.compiled_dense_forward = None
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    log.warning(
        "trainer.compile: compiling the dense step failed (%s: %s); continuing eager. "
        "Set trainer.compile=false to skip the attempt.",
        type(error).__name__, first_line,
    )

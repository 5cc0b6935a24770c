"""`trainer.compile`: torch.compile (inductor) of the dense part of the step, where it pays.

What is compiled is the model's `dense_forward` (DLRM: bottom MLP, dot interaction, top MLP; DLRM-DCNv2:
bottom MLP, cross network, top MLP; under autocast)
and, through AOTAutograd, its backward; the embedding backend stays eager (fbgemm kernels and
fused updates). Evaluation runs eager, so no second (inference) graph is compiled.

- `true` / `false`: always / never.
- `auto`: compile on CPU where the compile time pays back: a run of >= `AUTO_MIN_STEPS` steps
  (pays back a cold compile alone), or >= `AUTO_MIN_STEPS_WARM` steps when this dense graph is
  already in the cache (an earlier run compiled it) or the run is one job of a Hydra multirun (the
  first job's compile is reused by the others). Since the dot interaction and the tables run in
  our C kernels, compiling saves little (docs/benchmarks.md, "Tables and interaction in C": bf16
  step 14.8 -> 13.9 ms) against 29 s cold or ~3.6 s from the cache, so the default 1000-step run
  stays eager (25.5 s against 28.5 s compiled from the cache). CUDA stays eager under `auto`
  (not measured).

Compiled artifacts are cached between runs (inductor's FX graph and AOTAutograd caches) in
`$TORCHINDUCTOR_CACHE_DIR`, by default `~/.cache/dlrm/inductor` (`$XDG_CACHE_HOME` respected), so
the runs of a sweep after the first compile in seconds. If compiling fails, the step falls back
to eager with one warning and the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", True, False)  # YAML/Hydra parse `true`/`false` as booleans
AUTO_MIN_STEPS = 60_000  # cold: 29 s / ~0.9 ms saved per step = ~32,000 steps, x2 margin
AUTO_MIN_STEPS_WARM = 8_000  # cached: ~3.6 s / ~0.9 ms = ~4,000 steps, x2 margin
MARKER_DIR = "dlrm-compiled"  # in cache_dir(): one empty file per dense graph compiled here


def cache_dir() -> Path:
    """Where inductor keeps compiled artifacts: `$TORCHINDUCTOR_CACHE_DIR` if the user set it, else
    the user's cache (`$XDG_CACHE_HOME` or ~/.cache) / dlrm / inductor. Inductor writes its own
    default (/tmp/torchinductor_<user>) into that variable the first time it looks, which can
    happen while torchrec is imported, so that value does not count as the user's."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and os.path.abspath(env) != _inductor_default():
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dlrm" / "inductor"


def _inductor_default() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a torch without it: any value in the variable is the user's
        return None
    return os.path.abspath(default_cache_dir())


def should_compile(value, steps_to_go: int, device: torch.device, fingerprint: str = "") -> bool:
    """Resolve `trainer.compile` (auto | true | false) for a run with `steps_to_go` steps whose
    dense graph is `fingerprint` (see `graph_fingerprint`).

    Raises:
        ValueError: `value` is not one of auto, true, false (config.validate checks this first).
    """
    value = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    if value not in CHOICES or isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"trainer.compile={value!r}: choose one of auto, true, false")
    if value != "auto":
        return bool(value)
    if device.type != "cpu":
        return False
    if steps_to_go >= AUTO_MIN_STEPS:
        return True
    warm = bool(fingerprint) and (cache_dir() / MARKER_DIR / fingerprint).exists()
    return steps_to_go >= AUTO_MIN_STEPS_WARM and (warm or _in_multirun())


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def graph_fingerprint(model, batch_size: int) -> str:
    """What decides the compiled dense graph: torch version, the dense modules, precision, batch
    size, threads. Names this run's marker in the cache (16 hex digits)."""
    key = "|".join(
        str(x)
        for x in (
            torch.__version__, type(model).__name__, getattr(model, "dense_arch", None),
            getattr(model, "inter_arch", None), getattr(model, "over_arch", None), getattr(model, "num_features", None),
            getattr(model, "amp_dtype", None), batch_size, torch.get_num_threads(),
        )
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def mark_compiled(fingerprint: str) -> None:
    """Record that `fingerprint`'s graph is now in the cache (so `auto` compiles it next time)."""
    try:
        path = cache_dir() / MARKER_DIR / fingerprint
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:  # a read-only cache only costs the next run its warm start
        log.warning("trainer.compile: cannot record the compiled graph in %s (%s)", cache_dir(), e)


def enable(model) -> bool:
    """Compile `model.dense_forward` (lazily: the work happens at the first training step), with
    the inductor cache in `cache_dir()`. False, with one warning, for a model without one."""
    if not hasattr(model, "dense_forward"):
        log.warning("trainer.compile: %s has no dense_forward to compile; running eager", type(model).__name__)
        return False
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())  # inductor reads it at each use
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

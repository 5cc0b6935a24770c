"""Checks on the composed config that Hydra's YAML cannot express: types and ranges.

Run before any work, so `trainer.batch_size=0` or `rank=abc` fails in a second with one line
naming the key, not after minutes of data generation.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

# key -> (type, minimum); bools are rejected where an int is expected.
CHECKS: dict[str, tuple[type, float | None]] = {
    "seed": (int, 0),
    "rank": (int, 1),
    "compression": (float, 1),
    "trainer.max_steps": (int, 1),
    "trainer.batch_size": (int, 1),
    "trainer.eval_every": (int, 0),
    "trainer.eval_batches": (int, 0),
    "trainer.log_every": (int, 1),
    "trainer.warmup_steps": (int, 0),
    "trainer.grad_clip": (float, 0),
    "trainer.threads": (int, 0),
    "trainer.checkpoint_every": (int, 0),
    "optim.dense.lr": (float, 0),
    "optim.sparse.lr": (float, 0),
    "emb.dim": (int, 1),
}
CHOICES = {
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.compile": ("auto", True, False),
}
# What a sweeper may optimize: one results.json key, or a list for multi-objective search
# (e.g. [auc, embedding_bytes] with Optuna's NSGA-II sampler).
METRICS = ("auc", "logloss", "ne", "embedding_bytes", "compression_ratio", "step_time_ms", "samples_per_s")


class ConfigError(ValueError):
    pass


def get_dotted(cfg, key: str):
    """cfg["a"]["b"] for key "a.b" (a DictConfig or a plain dict); KeyError names the key."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def flatten(node, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples so values can key a group (the report)
    and dicts inside lists become sorted JSON strings."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list):
        return {prefix: tuple(_hashable(v) for v in node)}
    return {prefix: node}


def _hashable(v):
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    return json.dumps(v, sort_keys=True) if isinstance(v, dict) else v


def validate(cfg: DictConfig) -> None:
    for key, (kind, minimum) in CHECKS.items():
        value = get_dotted(cfg, key)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{key}={value!r} must be {'a number' if kind is float else 'an integer'}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}={value!r} must be >= {minimum}")
    metric = cfg.trainer.metric
    for m in [metric] if isinstance(metric, str) else list(metric):
        if m not in METRICS:
            raise ConfigError(f"trainer.metric={m!r}: choose from {list(METRICS)} (or a list of them)")
    resume = cfg.trainer.get("resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"trainer.resume={resume!r} must be a run directory or checkpoint path")
    for key, choices in CHOICES.items():
        if get_dotted(cfg, key) not in choices:
            raise ConfigError(f"{key}={get_dotted(cfg, key)!r}: choose one of {list(choices)}")

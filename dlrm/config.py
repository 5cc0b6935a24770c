"""Checks on the composed config that Hydra's YAML cannot express: types, ranges, choices.

Run before any work, so `trainer.batch_size=0` or `rank=abc` fails in a second with one line
naming the key, not after minutes of data generation.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from dlrm.options import ConfigError, Opt, check_options

__all__ = ["ConfigError", "Opt", "check_options", "validate", "get_dotted", "flatten"]

# What a sweeper may optimize: one results.json key, or a list for multi-objective search
# (e.g. [auc, embedding_bytes] with Optuna's NSGA-II sampler).
METRICS = ("auc", "logloss", "ne", "embedding_bytes", "compression_ratio", "step_time_ms", "samples_per_s")

# Every key of every group but `emb` (whose options each backend declares itself, next to its
# code), with its type, range or choices. A key missing here is an unknown key: add it with the
# YAML that defines it. The YAML holds the defaults; these tables hold only what is valid.
TOP = {
    "seed": Opt(int, min=0),
    "rank": Opt(int, min=1),
    "compression": Opt(float, min=1),
}
TRAINER = {
    "max_steps": Opt(int, min=1),
    "batch_size": Opt(int, min=1),
    "device": Opt(str, choices=("auto", "cpu", "cuda")),
    "precision": Opt(str, choices=("auto", "fp32", "bf16", "fp16")),
    "compile": Opt((str, bool), choices=("auto", True, False)),  # dlrm/compile.py
    "eval_every": Opt(int, min=0),
    "eval_batches": Opt(int, min=0),
    "periodic_eval_batches": Opt(int, min=0),
    "log_every": Opt(int, min=1),
    "warmup_steps": Opt(int, min=0),
    "grad_clip": Opt(float, min=0),
    "threads": Opt(int, min=0),
    "progress": Opt(bool),
    "checkpoint_every": Opt(int, min=0),
    "resume": Opt(str, nullable=True, what="a run directory or checkpoint path"),
    "metric": Opt((str, list)),
}
_DATA_COMMON = {
    "name": Opt(str),
    "train_split": Opt(str),
    "eval_split": Opt(str),
    "max_rows": Opt(int, min=0),
    "shuffle": Opt(bool),
    "workers": Opt(int, min=0),
}
DATA = {  # by data.name
    "synthetic": {
        **_DATA_COMMON,
        "root": Opt(str),
        "seed": Opt(int, min=0),
        "rows": Opt(int, min=1),
        "eval_rows": Opt(int, min=1),
        "max_cardinality": Opt(int, min=0),
        "table_rows": Opt(dict, nullable=True),
        "zipf": Opt(float, min=0),
        "click_rate": Opt(float, min=0),
        "row_group_rows": Opt(int, min=1),
        "multi_hot": Opt(dict, nullable=True),
    },
    "parquet": {**_DATA_COMMON, "path": Opt(str)},
}
_TOWERS = {"name": Opt(str, choices=("dlrm", "dcnv2")), "bottom_mlp": Opt(list), "top_mlp": Opt(list)}
MODEL = {  # by model.name
    "dlrm": {**_TOWERS, "kernel": Opt(str, choices=("auto", "native", "torch"))},
    "dcnv2": {**_TOWERS, "cross_layers": Opt(int, min=1), "low_rank": Opt(int, min=1)},
}
OPTIM = {
    "dense": {"name": Opt(str, choices=("adam", "adagrad", "sgd")), "lr": Opt(float, min=0)},
    # the fused table optimizers (fbgemm's on CPU lack Adam; ours mirrors fbgemm's three)
    "sparse": {
        "name": Opt(str, choices=("rowwise_adagrad", "sgd", "adagrad")),
        "lr": Opt(float, min=0),
        "eps": Opt(float, min=0),
        "kernel": Opt(str, choices=("auto", "native", "torch", "fbgemm")),
    },
}


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
    """Check the whole composed config before any work; raise ConfigError naming the key.

    Types, ranges and choices of every group's keys, and keys no schema knows (e.g. added with
    `+trainer.max_step=10`). Hydra itself already refuses unknown groups and plain overrides of
    keys that do not exist."""
    groups = {"emb", "data", "model", "optim", "trainer", "hydra"}
    check_options({k: v for k, v in cfg.items() if k not in groups}, TOP, "")
    check_options(cfg.trainer, TRAINER, "trainer")
    metric = cfg.trainer.metric
    for m in [metric] if isinstance(metric, str) else list(metric):
        if m not in METRICS:
            raise ConfigError(f"trainer.metric={m!r}: choose from {list(METRICS)} (or a list of them)")
    data_schema = DATA.get(cfg.data.name, DATA["parquet"])  # criteo_* are parquet datasets
    check_options(cfg.data, data_schema, "data")
    Opt(str, choices=tuple(MODEL)).check("model.name", cfg.model.name)
    check_options(cfg.model, MODEL[cfg.model.name], "model")
    for part in ("dense", "sparse"):
        check_options(cfg.optim[part], OPTIM[part], f"optim.{part}")
    check_options(cfg.optim, {"dense": Opt(dict), "sparse": Opt(dict)}, "optim")
    # Each backend declares its own emb.* options, beside its code. Imported here, on use, so that
    # `dlrm.config` stays light (dlrm.report imports it without torch or fbgemm).
    from dlrm.embeddings.registry import check_emb_config

    check_emb_config(cfg.emb)

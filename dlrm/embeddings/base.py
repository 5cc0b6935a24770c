"""The contract every embedding backend implements.

A backend is an `nn.Module` that behaves like torchrec's `EmbeddingBagCollection`: it takes a
`KeyedJaggedTensor` of ids (single- or multi-hot) and returns a `KeyedTensor` with one pooled
`[B, dim]` block per feature, in the order of its `tables`' features. On top of that it reports
its memory and its statistics, and it owns how its parameters are optimized:

- parameters updated *fused in backward* (fbgemm tables) need nothing from the trainer;
- any other parameters (e.g. TT cores) are stepped by the optimizers that `optimizers()` returns;
- the trainer's dense optimizer never sees a backend's parameters.

Example::

    tables = [TableSpec("t_C1", rows=100, dim=16, features=("C1",))]
    emb = build_embeddings(tables, emb_cfg, sparse_optim_cfg, device)
    pooled = emb(kjt)           # KeyedTensor, pooled["C1"] is [B, 16]
    emb.embedding_bytes(), emb.full_bytes(), emb.stats()
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.options import Opt, check_options

FP32_BYTES = 4
POOLINGS = ("sum", "mean")  # how a multi-hot bag's rows are pooled
# The keys every backend's emb section has (conf/emb/full.yaml); backends add their own.
TABLE_OPTIONS: dict[str, Opt] = {
    "name": Opt(str),
    "dim": Opt(int, min=1),
    "pooling": Opt(str, choices=POOLINGS),
    "check_ids": Opt(bool),
    # under torchrun: how torchrec places the tables (dlrm/distributed/model.py, docs/distributed.md)
    "sharding": Opt(str, choices=("auto", "table_wise", "column_wise", "table_column_wise", "row_wise",
                                  "data_parallel")),
    "rank_memory_gb": Opt(float, min=0, nullable=True),  # under torchrun: the planner's per-rank memory
    "weights_precision": Opt(str),  # fp32 | fp16; tables.check_weights_precision says why not int8
    "budget": Opt(float, min=1, nullable=True),  # budget.py
    "budget_unreachable": Opt(str, choices=("fail", "record")),
}
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class Runtime:
    """Facts of this run that are not settings: passed to backends, never written into the config.

    `seed` is the training seed (every random choice a backend makes derives from it);
    `store_dir` is where a backend keeps files that outlive the process when its config names no
    place (a disk store goes to `store_dir/emb_store`; None: a fresh temp dir); `resuming` says
    whether this run continues a checkpointed one (a disk store is then reopened, never created).
    `data_dir` is the dataset's directory, where frequency-aware backends (hybrid, mde) find
    per-id counts (`dlrm.data.counts.ensure_counts`); None outside a training run.
    """

    seed: int = 0
    store_dir: Path | None = None
    resuming: bool = False
    data_dir: Path | None = None


@functools.lru_cache(maxsize=None)
def yaml_defaults(name: str) -> dict:
    """The settings `conf/emb/<name>.yaml` gives (its `defaults:` list merged, `${rank}` and
    `${compression}` resolved from conf/config.yaml), as a plain dict; {} if there is no such file.

    The YAML is the one place defaults are written: a backend built outside Hydra (tests,
    benchmarks) with a partial config gets the rest from here, never from code."""
    file = CONF_DIR / "emb" / f"{name}.yaml"
    if not file.exists():
        return {}
    node = OmegaConf.load(file)
    parts = list(node.pop("defaults", None) or ["_self_"])
    merged = OmegaConf.create()
    for part in parts if "_self_" in parts else [*parts, "_self_"]:
        merged = OmegaConf.merge(merged, node if part == "_self_" else yaml_defaults(part))
    top = OmegaConf.load(CONF_DIR / "config.yaml")
    root = OmegaConf.create({"rank": top.rank, "compression": top.compression, "emb": merged})
    return OmegaConf.to_container(root, resolve=True)["emb"]


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: `rows` x `dim`, looked up by each feature in `features`."""

    name: str
    rows: int
    dim: int
    features: tuple[str, ...]

    def full_bytes(self) -> int:
        """What this table costs uncompressed: fp32 weights + row-wise Adagrad state (1 per row).

        This is the baseline every compression ratio is measured against, whatever optimizer the
        baseline run happens to use, so ratios are comparable across runs.
        """
        return self.rows * (self.dim + 1) * FP32_BYTES


class EmbeddingBackend(nn.Module, ABC):
    """Base class: a KJT -> KeyedTensor module that accounts for its memory."""

    name: str = "?"
    # conf/emb/<config_name>.yaml holds this backend's settings and their defaults (None: `name`).
    config_name: str | None = None
    # Every emb.* key this backend reads, with its type, range or choices (dlrm/options.py);
    # `check_config` checks a whole emb section against it (unknown keys too) in validate().
    options: dict[str, Opt] = TABLE_OPTIONS

    def __init__(self, tables: list[TableSpec]) -> None:
        super().__init__()
        self.tables = list(tables)
        self.features = [f for t in self.tables for f in t.features]
        self.dims = [t.dim for t in self.tables for _ in t.features]

    @classmethod
    def settings(cls, cfg: DictConfig) -> DictConfig:
        """`cfg` (the `emb` section, resolved) over the defaults of this backend's YAML file, so a
        backend built from a partial config reads every key it needs from the YAML. The values
        of its declared `options` are checked (ConfigError, a ValueError, naming `emb.<key>`);
        keys it does not declare are left to `check_config` (the whole-config validation)."""
        given = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        merged = OmegaConf.merge(yaml_defaults(cls.config_name or cls.name), given)
        check_options({k: v for k, v in merged.items() if k in cls.options}, cls.options, "emb")
        return merged

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Check a composed emb section: every key declared in `options`, each value fits.
        Raises ConfigError naming `emb.<key>`."""
        check_options(cfg, cls.options, "emb")

    @abstractmethod
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of `features` (whose keys must be `self.features`, in order)."""

    @abstractmethod
    def embedding_bytes(self) -> int:
        """Bytes of parameters plus optimizer state this backend owns."""

    def full_bytes(self) -> int:
        """Bytes the same tables would need uncompressed (see `TableSpec.full_bytes`)."""
        return sum(t.full_bytes() for t in self.tables)

    def stats(self) -> dict[str, float]:
        """Flat numbers for TensorBoard and results.json (collision rate, cache hit rate, ...)."""
        return {}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers for parameters not updated fused in backward ([] if all are).

        The trainer calls `zero_grad()` and `step()` on each, right beside the dense optimizer.
        """
        return []

    # Cached backends flush at interpreter exit so no update is lost; the trainer turns that off
    # when it checkpoints, so a crash leaves a disk store at its last checkpoint, not past it.
    flush_at_exit: bool = True

    def flush(self, step: int | None = None) -> None:
        """Write back anything held outside the cold store (caches) and make the store durable.

        Called at the end of a run and at checkpoints, where `step` tags the flushed state (a
        store that outlives the process records it: `committed_step`). A no-op for backends
        whose parameters live in one place."""

    def checkpoint_state(self) -> dict:
        """Everything needed to continue training exactly, for `torch.save`.

        The default is the module's state_dict: it holds fbgemm tables' weights and their fused
        optimizer state (TBE buffers), TT cores, hash parameters. Backends with bookkeeping
        outside parameters and buffers (caches) extend it.
        """
        return {"module": self.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["module"])

    def committed_step(self) -> int | None:
        """The step whose state a store outside the checkpoint holds (the disk store), or None
        when `checkpoint_state()` holds everything. Resuming picks the checkpoint of this step."""
        return None

    def describe(self) -> str:
        """One line per table for the logs: what each table became."""
        return "\n".join(f"{t.name}: {self.name} {t.rows} x {t.dim}" for t in self.tables)


def check_ids_in_range(features: KeyedJaggedTensor, tables: list[TableSpec]) -> None:
    """Raise a one-line error naming the feature whose ids fall outside its table.

    fbgemm's own bounds check either clamps silently or aborts the process; this names the
    culprit instead. One segment max over the batch: cheap next to the lookup itself.
    """
    lengths = features.length_per_key()
    values = features.values()
    if values.numel() == 0:
        return
    device = values.device
    rows = torch.tensor([t.rows for t in tables for _ in t.features], device=device)
    key_of_value = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )
    top = torch.full((len(lengths),), -1, dtype=values.dtype, device=device).scatter_reduce(
        0, key_of_value, values, reduce="amax"
    )
    low = torch.full(
        (len(lengths),), torch.iinfo(values.dtype).max, dtype=values.dtype, device=device
    ).scatter_reduce(
        0, key_of_value, values, reduce="amin"
    )
    bad = ((top >= rows) | (low < 0)).nonzero()
    if len(bad):
        i = int(bad[0])
        name = features.keys()[i]
        raise ValueError(
            f"feature {name}: ids must be in [0, {int(rows[i])}) but the batch has ids in "
            f"[{int(low[i])}, {int(top[i])}]"
        )


def per_table(
    tables: list[TableSpec], features: KeyedJaggedTensor
) -> Iterator[tuple[TableSpec, torch.Tensor, torch.Tensor]]:
    """Yield `(table, ids, offsets)` per table of a key-major KJT whose keys are the tables'
    features in order (`EmbeddingBackend.features`).

    A table's features are consecutive keys, so its ids are one contiguous run of `values()`:
    `ids` is that run (`[n]`, a view) and `offsets` its bags' offsets rebased to start at 0
    (`[len(table.features) * B + 1]`), ready for a pooled lookup of `ids`.

    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([5, 6, 7]),
    ...                                           torch.tensor([1, 2]))
    >>> [(t.name, ids.tolist(), off.tolist()) for t, ids, off in per_table(
    ...     [TableSpec("t_a", 9, 4, ("a",)), TableSpec("t_b", 9, 4, ("b",))], kjt)]
    [('t_a', [5], [0, 1]), ('t_b', [6, 7], [0, 2])]
    """
    values, offsets = features.values(), features.offsets()
    value_start = features.offset_per_key()
    batch = features.stride()
    key = 0
    for t in tables:
        n = len(t.features)
        start = value_start[key]
        ids = values[start : value_start[key + n]]
        yield t, ids, offsets[key * batch : (key + n) * batch + 1] - start
        key += n

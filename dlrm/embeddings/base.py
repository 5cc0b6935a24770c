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

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

FP32_BYTES = 4


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

    def __init__(self, tables: list[TableSpec]) -> None:
        super().__init__()
        self.tables = list(tables)
        self.features = [f for t in self.tables for f in t.features]
        self.dims = [t.dim for t in self.tables for _ in t.features]

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

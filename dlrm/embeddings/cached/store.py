"""The Store protocol: what the write-back cache (cache.py) needs of a cold store, and nothing more.

A store holds every row of its tables with the fused optimizer's state for that row (fp32
`[rows, dim]` weights and `[rows, width]` state). Implementations: `HostStore` (host.py, host
memory) and `DiskStore` (disk.py, memory-mapped files with an undo journal). A new store (e.g.
fp16 rows, a remote key-value store) implements this and is added to `STORES` in cache.py.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Store(Protocol):
    committed_step: int | None
    """The step of the last `flush(step)` that outlives the process (None: nothing does)."""

    def read(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [n, dim], state [n, width]) of rows `ids` ([n] int64, CPU) of table `name`."""

    def write(self, name: str, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> None:
        """Write rows `ids` of table `name` (state unchanged when `s` is None)."""

    def flush(self, step: int | None = None) -> None:
        """Make every write so far durable, tagged `step` (a crash later returns to this state)."""

    def mark_dirty(self) -> None:
        """Note that writes follow: until the next flush the store is not at `committed_step`."""

    def resident_bytes(self) -> int:
        """Bytes this store keeps in memory (files' page cache excluded)."""

    def checkpoint_state(self) -> Any:
        """What a checkpoint must hold of the store (None if the store outlives the process)."""

    def load_checkpoint_state(self, saved: Any) -> None:
        """Restore `checkpoint_state()`'s value."""

    def describe(self) -> str:
        """Where the rows live, for the logs."""

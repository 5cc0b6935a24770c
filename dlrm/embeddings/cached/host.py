"""The host store behind `emb=cached emb.store=host`: full tables plus optimizer state as ordinary
tensors in host memory (the Store protocol: store.py). Nothing outlives the process, so a
checkpoint carries the tables (`checkpoint_state`)."""

from __future__ import annotations

import torch

from dlrm.embeddings.base import FP32_BYTES, TableSpec
from dlrm.embeddings.tables import init_uniform_


class HostStore:
    """Full tables plus optimizer state as ordinary tensors in host memory."""

    kind = "host"

    def __init__(self, tables: list[TableSpec], state_width: int) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        for t in tables:
            self.weights[t.name] = torch.empty(t.rows, t.dim)
            init_uniform_(self.weights[t.name], t.rows)
            self.state[t.name] = torch.zeros(t.rows, state_width)

    def read(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights[name].index_select(0, ids), self.state[name].index_select(0, ids)

    def write(self, name: str, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> None:
        self.weights[name].index_copy_(0, ids, w)
        if s is not None:
            self.state[name].index_copy_(0, ids, s)

    def resident_bytes(self) -> int:
        return sum(
            w.numel() * FP32_BYTES + s.numel() * FP32_BYTES
            for w, s in zip(self.weights.values(), self.state.values())
        )

    committed_step = None  # nothing outlives the process: the checkpoint holds everything

    def flush(self, step: int | None = None) -> None:
        pass

    def mark_dirty(self) -> None:
        pass

    def checkpoint_state(self) -> tuple[dict, dict]:
        return self.weights, self.state

    def load_checkpoint_state(self, saved: tuple[dict, dict]) -> None:
        for mine, theirs in zip((self.weights, self.state), saved):
            for name in mine:
                mine[name].copy_(theirs[name])

    def describe(self) -> str:
        return "host memory"

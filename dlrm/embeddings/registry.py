"""Backend registry and the per-table policy.

`emb.name` picks a backend class. A policy then decides per table which backend it gets: as in
TT-Rec, only tables with at least `emb.min_rows` rows (or those listed in `emb.tables`) are
compressed; the small ones stay `full`, which costs little memory and keeps them exact. When a
backend gets only some tables, `SplitEmbeddings` runs each group and concatenates the outputs.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import EmbeddingBackend, TableSpec

BACKENDS: dict[str, type[EmbeddingBackend]] = {}


def register(name: str, cls: type[EmbeddingBackend]) -> None:
    BACKENDS[name] = cls


def _load_backends() -> None:
    # Importing a backend module registers it; done lazily so `registry` has no import cycle.
    from dlrm.embeddings import full  # noqa: F401

    for optional in ("hashed", "tt", "cached"):
        try:
            __import__(f"dlrm.embeddings.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"dlrm.embeddings.{optional}":
                raise


def compressed_tables(tables: list[TableSpec], cfg: DictConfig) -> list[TableSpec]:
    """The tables the policy hands to the compressing backend."""
    explicit = cfg.get("tables")
    if explicit:
        known = {t.name for t in tables} | {f for t in tables for f in t.features}
        unknown = [n for n in explicit if n not in known]
        if unknown:
            raise ValueError(f"emb.tables names unknown tables/features {unknown}")
        return [t for t in tables if t.name in explicit or set(t.features) & set(explicit)]
    return [t for t in tables if t.rows >= cfg.get("min_rows", 0)]


def build_embeddings(
    tables: list[TableSpec], cfg: DictConfig, optim: DictConfig, device: torch.device
) -> EmbeddingBackend:
    """The embedding module for `tables` under the `emb` config `cfg`."""
    _load_backends()
    if cfg.name not in BACKENDS:
        raise ValueError(f"emb.name={cfg.name!r}: known backends are {sorted(BACKENDS)}")
    backend = BACKENDS[cfg.name]
    chosen = tables if cfg.name == "full" else compressed_tables(tables, cfg)
    rest = [t for t in tables if t not in chosen]
    parts = []
    if chosen:
        parts.append(backend(chosen, cfg, optim, device))
    if rest:
        parts.append(BACKENDS["full"](rest, cfg, optim, device))
    return parts[0] if len(parts) == 1 else SplitEmbeddings(parts)


class SplitEmbeddings(EmbeddingBackend):
    """Several backends, each owning some features.

    The output is keyed by feature in group order (compressed first); consumers index it by key or
    treat the blocks as an unordered set, as DLRM's interaction does.
    """

    def __init__(self, parts: list[EmbeddingBackend]) -> None:
        super().__init__([t for p in parts for t in p.tables])
        self.parts = torch.nn.ModuleList(parts)
        self.name = parts[0].name
        self.split_sizes = [len(p.features) for p in parts]
        # KJT.permute takes, for each output key, the index of the input key; set on first batch.
        self.group_permute: list[int] | None = None

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.group_permute is None:
            index = {k: i for i, k in enumerate(features.keys())}
            self.group_permute = [index[f] for f in self.features]
        grouped = features.permute(self.group_permute)
        outputs = [p(kjt) for p, kjt in zip(self.parts, grouped.split(self.split_sizes))]
        return KeyedTensor(
            keys=self.features,
            length_per_key=self.dims,
            values=torch.cat([o.values() for o in outputs], dim=1),
        )

    def embedding_bytes(self) -> int:
        return sum(p.embedding_bytes() for p in self.parts)

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for p in self.parts:
            merged.update(p.stats())
        return merged

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for p in self.parts for o in p.optimizers()]

    def flush(self, step: int | None = None) -> None:
        for p in self.parts:
            p.flush(step)

    def checkpoint_state(self) -> dict:
        return {"parts": [p.checkpoint_state() for p in self.parts]}

    def load_checkpoint_state(self, state: dict) -> None:
        for p, s in zip(self.parts, state["parts"], strict=True):
            p.load_checkpoint_state(s)

    def committed_step(self) -> int | None:
        steps = {p.committed_step() for p in self.parts} - {None}
        return steps.pop() if steps else None

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.parts)

"""Which tables a compressing backend gets, how configs name tables, and `SplitEmbeddings`.

As in TT-Rec, only tables with at least `emb.min_rows` rows (or those listed in `emb.tables`)
are compressed; the small ones stay `full`, which costs little memory and keeps them exact. When
a backend gets only some tables, `SplitEmbeddings` runs each group and concatenates the outputs.

Table names. A table is named in configs (`emb.tables`, `emb.buckets`, `emb.m`, `emb.shapes`) by
the feature that looks it up: `C3` (for a table shared by several features, any of them). The
internal name `t_C3` (TableSpec.name: state_dict keys, disk store files, per-table stats) is still
accepted there with a FutureWarning.
"""

from __future__ import annotations

import warnings

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import TABLE_OPTIONS, EmbeddingBackend, TableSpec
from dlrm.options import Opt

# The keys of a backend that compresses only some tables (the rest stay full): the policy's.
POLICY_OPTIONS: dict[str, Opt] = {
    **TABLE_OPTIONS,
    "min_rows": Opt(int, min=0),
    "tables": Opt(list, nullable=True),
}


def resolve_table(name: str, tables: list[TableSpec], key: str) -> TableSpec | None:
    """The table a config names by feature (`C3`), or by its deprecated internal name (`t_C3`,
    with a FutureWarning naming `key`); None if `tables` has no such table or feature."""
    for t in tables:
        if name in t.features:
            return t
    for t in tables:
        if name == t.name:
            warnings.warn(
                f"{key}: name tables by their feature ({t.features[0]}), not {t.name}; "
                "the t_ names are deprecated in configs",
                FutureWarning,
                stacklevel=3,
            )
            return t
    return None


def compressed_tables(tables: list[TableSpec], settings) -> list[TableSpec]:
    """The tables the policy hands to a compressing backend, from its settings (the emb section):
    those named in `emb.tables` (by feature) if it is non-empty, else those with at least
    `emb.min_rows` rows. A backend whose settings have neither key takes every table.
    Raises ValueError naming unknown names."""
    named = settings.tables if "tables" in settings else None
    if named:
        found = {str(n): resolve_table(str(n), tables, "emb.tables") for n in named}
        unknown = [n for n, t in found.items() if t is None]
        if unknown:
            raise ValueError(f"emb.tables names unknown tables/features {unknown}")
        return [t for t in tables if t in found.values()]
    if "min_rows" not in settings:
        return list(tables)
    return [t for t in tables if t.rows >= settings.min_rows]


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

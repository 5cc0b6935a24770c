"""The embedding backends in a form torchrec's DistributedModelParallel (DMP) can shard.

`ShardedTables` takes the single-process backend `build_embeddings` made and re-expresses it as

    KJT --id transform per part (KJT -> KJT)--> one torchrec EmbeddingBagCollection --combine--> KeyedTensor

- `full`: no transform; its tables go into the collection as they are;
- `hashed`: the part's hash (`HashedEmbeddings.remap`) maps ids to buckets of its plain tables;
- `qr`: the part's `remap` splits each id into (x // m, x % m), two virtual features `C3_q`,
  `C3_r` over the Q and R tables; after the lookup they are combined (mult / add / concat), as
  `QREmbeddings.forward` does (combiner=mult only for single-hot batches: multi-hot mult pools
  after combining, which a pooled collection cannot do);
- `tt`: its cores stay a plain module inside the model, replicated on every rank; DMP's
  DistributedDataParallel wrapper all-reduces their gradients and `optimizers()` steps them;
- `cached`: refused (its cache and store live in one process; see docs/distributed.md).

The collection is built on the meta device; after DMP has placed each table (or shard of one)
on its rank, `load_initial_weights` copies this rank's slice of the single-process backend's
initial weights in, so a distributed run starts from exactly the weights a plain run with the
same seed starts from. Tables are updated fused in backward by torchrec's fused kernels (fbgemm),
with the optimizer of `optim.sparse` set through `apply_optimizer_in_backward`.

Gradients. Each rank's loss is the mean over its own batch. torchrec's output all-to-all divides
the gradients it sends back to a table's owner by the world size in backward
(`torchrec.distributed.comm_ops.GRADIENT_DIVISION`, on by default; `wrap` checks it), and DDP
averages the replicated weights' gradients: every table and every dense weight moves as in one
process with the global batch (tested against one process, with SGD, whose step shows the scale).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.optim import SGD as TrecSGD
from torchrec.optim import Adagrad as TrecAdagrad
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.config import ConfigError
from dlrm.embeddings.base import EmbeddingBackend, TableSpec, check_ids_in_range
from dlrm.embeddings.tables import check_fused_optimizer

# optim.sparse.name -> the optimizer class torchrec turns into fbgemm's fused one (and runs as a
# plain in-backward optimizer for data-parallel tables, whose kernel is not fused).
IN_BACKWARD = {"sgd": TrecSGD, "rowwise_adagrad": RowWiseAdagrad, "adagrad": TrecAdagrad}
POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
EBC_PREFIX = "sparse_arch.ebc."  # where the collection sits in DLRM (sharding plan keys)


def _parts(backend: EmbeddingBackend) -> list[EmbeddingBackend]:
    parts = getattr(backend, "parts", None)
    return list(parts) if parts is not None else [backend]


class ShardedTables(EmbeddingBackend):
    """`backend` (full / hashed / qr / tt, or a policy split of them) with its plain tables in one
    torchrec EmbeddingBagCollection that DMP shards. Same interface as any backend: KJT in (keys:
    the backend's features, any order), KeyedTensor out, keys in `self.features` order.

    Raises ConfigError for `cached` and for an optimizer fbgemm cannot fuse."""

    def __init__(self, backend: EmbeddingBackend, optim: DictConfig, pooling: str) -> None:
        super().__init__(backend.tables)
        self.name = backend.name
        check_fused_optimizer(optim)
        configs: list[EmbeddingBagConfig] = []
        self.initial_weights: dict[str, torch.Tensor] = {}
        self.kinds: list[str] = []
        for part in _parts(backend):
            kind = part.name
            if kind == "cached":
                raise ConfigError(
                    "emb=cached is single-process: its cache and host/disk store live in one "
                    "process (run without torchrun, or use emb=full/hashed/qr/tt)"
                )
            if kind not in ("full", "hashed", "qr", "tt"):
                raise ConfigError(f"emb={kind}: no distributed form (full, hashed, qr, tt have one)")
            self.kinds.append(kind)
            if kind == "tt":
                continue
            physical = part.physical_tables if kind != "full" else part.tables
            part_pooling = "sum" if kind == "qr" and part.combiner == "mult" else pooling
            for t, w in zip(physical, part.tbe.split_embedding_weights()):
                configs.append(_config(t, part_pooling))
                self.initial_weights[t.name] = w.detach().clone()
            del part.tbe  # the collection replaces it; no second copy of the tables
        self.parts = nn.ModuleList(_parts(backend))
        self.split_sizes = [len(p.features) for p in self.parts]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta")) if configs else None
        self.optim_class, self.optim_kwargs = IN_BACKWARD[optim.name], _optim_kwargs(optim)
        if self.ebc is not None:
            # a copy: torchrec rewrites the dict it is given into fbgemm's names (lr -> learning_rate)
            apply_optimizer_in_backward(self.optim_class, self.ebc.parameters(), dict(self.optim_kwargs))
        self.replicated_optimizer: torch.optim.Optimizer | None = None
        self._bytes = sum(_config_bytes(c, optim.name) for c in configs)
        self.table_features = {c.name: list(c.feature_names) for c in configs}
        self.group_permute: list[int] | None = None
        self.plan_text = ""

    # -- after DMP -------------------------------------------------------------------------

    def set_plan(self, plan_text: str) -> None:
        """Record the plan (its text, for `describe`) and make the optimizer of the tables DMP
        placed data-parallel (if any)."""
        self.plan_text = plan_text
        # Data-parallel tables use torchrec's dense kernel, which fuses no optimizer: their
        # gradients (averaged by DDP) are stepped here, like the TT cores, by the same rule.
        replicated = [
            p for p in self.ebc.parameters() if p.requires_grad and not hasattr(p, "_in_backward_optimizers")
        ]
        if replicated:
            self.replicated_optimizer = self.optim_class(replicated, **self.optim_kwargs)

    @torch.no_grad()
    def load_initial_weights(self, state: dict) -> None:
        """Copy this rank's shards of the single-process initial weights into the sharded tables.
        `state` is the DMP'd model's state_dict (ShardedTensors for sharded tables, whole tensors
        for data-parallel ones), whose tensors are views of the tables' storage."""
        for name, full in self.initial_weights.items():
            target = state[f"{EBC_PREFIX}embedding_bags.{name}.weight"]
            if hasattr(target, "local_shards"):
                for shard in target.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
            else:
                target.copy_(full)
        self.initial_weights = {}

    # -- forward ---------------------------------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.group_permute is None:
            index = {k: i for i, k in enumerate(features.keys())}
            self.group_permute = [index[f] for f in self.features]
        grouped = features.permute(self.group_permute).split(self.split_sizes)
        lookups, tt_out = [], {}
        for part, kind, kjt in zip(self.parts, self.kinds, grouped):
            if kind == "tt":
                tt_out.update(part(kjt).to_dict())
            else:
                lookups.append(self._transform(part, kind, kjt))
        pooled = {}
        if lookups:
            kjt = lookups[0] if len(lookups) == 1 else KeyedJaggedTensor.concat(lookups)
            # Sharded outputs may come back in another key order: index by key only.
            pooled = self.ebc(kjt).to_dict()
        blocks = []
        for part, kind in zip(self.parts, self.kinds):
            for f in part.features:
                blocks.append(tt_out[f] if kind == "tt" else self._combine(part, kind, f, pooled))
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=torch.cat(blocks, 1))

    def _transform(self, part: EmbeddingBackend, kind: str, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT of rows of `part`'s physical tables for the ids of `kjt` (its features)."""
        if kind == "full":
            if part.check_ids:
                check_ids_in_range(kjt, part.tables)
            return kjt
        if kind == "qr":
            if part.check_ids:
                check_ids_in_range(kjt, part.tables)
            if part.combiner == "mult" and not bool((kjt.lengths() == 1).all()):
                raise ValueError(
                    "emb=qr combiner=mult with multi-hot features is single-process only "
                    "(set emb.combiner=add or concat to run it distributed)"
                )
            if part.training:
                part._last = kjt  # qr's collision stats read the last training batch
        rows, offsets = part.remap(kjt)  # hashed: also keeps its stats batch
        keys = [f for t in part.physical_tables for f in t.features]
        return KeyedJaggedTensor(keys=keys, values=rows, offsets=offsets, stride=kjt.stride())

    @staticmethod
    def _combine(part, kind: str, feature: str, pooled: dict) -> torch.Tensor:
        if kind != "qr":
            return pooled[feature]
        q, r = pooled[f"{feature}_q"], pooled[f"{feature}_r"]
        if part.combiner == "mult":
            return q * r
        return q + r if part.combiner == "add" else torch.cat([q, r], 1)

    # -- the backend contract --------------------------------------------------------------

    def embedding_bytes(self) -> int:
        """Weights plus optimizer state of all tables, one copy each (summed over ranks, not
        counting data-parallel replicas), plus the TT cores: what one process would hold."""
        return self._bytes + sum(p.embedding_bytes() for p, k in zip(self.parts, self.kinds) if k == "tt")

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for p in self.parts:
            merged.update(p.stats())
        return merged

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The TT cores' optimizers, and the one of data-parallel tables (if any)."""
        tt = [o for p, k in zip(self.parts, self.kinds) if k == "tt" for o in p.optimizers()]
        return tt + ([self.replicated_optimizer] if self.replicated_optimizer is not None else [])

    def describe(self) -> str:
        lines = []
        for p, k in zip(self.parts, self.kinds):
            lines += [line if k == "tt" else f"{line} (torchrec)" for line in p.describe().splitlines()]
        return "\n".join(lines + ([self.plan_text] if self.plan_text else []))

    def checkpoint_state(self) -> dict:
        raise NotImplementedError("sharded tables are checkpointed by dlrm.distributed.checkpoint")


def _config(t: TableSpec, pooling: str) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=t.name,
        embedding_dim=t.dim,
        num_embeddings=t.rows,
        feature_names=list(t.features),
        pooling=POOLING[pooling],
    )


def _optim_kwargs(optim: DictConfig) -> dict:
    kwargs = {"lr": float(optim.lr)}
    if "eps" in optim and optim.name != "sgd":
        kwargs["eps"] = float(optim.eps)
    return kwargs


def _config_bytes(c: EmbeddingBagConfig, optimizer: str) -> int:
    state = {"sgd": 0, "rowwise_adagrad": 1, "adagrad": c.embedding_dim}[optimizer]
    return c.num_embeddings * (c.embedding_dim + state) * 4

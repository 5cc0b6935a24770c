"""Wrap a DLRM in torchrec's DistributedModelParallel (DMP): plan, shard, data-parallel dense.

    model = build_model(cfg, cardinalities, device, dense_in, runtime)
    model = wrap(model, cfg, device)        # DistributedDLRM: same calls as DLRM

The tables go into one torchrec EmbeddingBagCollection (`ShardedTables`); torchrec's
EmbeddingShardingPlanner places them, constrained to the sharding types the device's
communication backend runs (`emb.sharding`), on rank 0 alone; the plan (or the planning error,
as one line) is broadcast, so every rank shards alike or every rank fails alike instead of
waiting for a rank that raised. DMP then shards the collection and wraps the rest of the model
(MLPs, TT cores) in DistributedDataParallel.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig
from torch import nn
from torchrec.distributed import DistributedModelParallel, comm_ops
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import (
    EmbeddingShardingPlanner,
    ParameterConstraints,
    Topology,
)
from torchrec.distributed.types import ShardingPlan

from dlrm import distributed
from dlrm.config import ConfigError
from dlrm.distributed.tables import EBC_PREFIX, ShardedTables
from dlrm.model import DLRM

log = logging.getLogger(__name__)

# emb.sharding values -> torchrec ShardingType values the planner may choose from.
SHARDING = {
    "table_wise": ["table_wise"],
    "column_wise": ["column_wise"],
    "row_wise": ["row_wise"],
    "data_parallel": ["data_parallel"],
    "table_column_wise": ["table_column_wise"],
}
# gloo (CPU) has no reduce_scatter, which row-wise sharding's output exchange needs
# (measured with torchrec 1.8: table/column/table-column-wise and data-parallel run on gloo).
CPU_SHARDING = ["table_wise", "column_wise", "table_column_wise", "data_parallel"]


def sharding_types(choice: str, device: torch.device) -> list[str] | None:
    """The sharding types the planner may use for `emb.sharding=choice` on `device` (None: any).
    Raises ConfigError for an unknown value or row_wise on CPU."""
    if choice == "auto":
        return CPU_SHARDING if device.type == "cpu" else None
    if choice not in SHARDING:
        raise ConfigError(f"emb.sharding={choice!r}: choose one of {['auto', *SHARDING]}")
    if device.type == "cpu" and not set(SHARDING[choice]) <= set(CPU_SHARDING):
        raise ConfigError(
            f"emb.sharding={choice}: not on CPU (gloo has no reduce_scatter); use one of "
            f"{['auto', *CPU_SHARDING]} or run on CUDA (NCCL)"
        )
    return SHARDING[choice]


class DistributedDLRM(nn.Module):
    """A DMP-wrapped DLRM that answers the calls the trainer makes on a DLRM: forward(dense,
    sparse) -> logits [B], `sparse_arch` (the ShardedTables backend), `dense_parameters()`."""

    def __init__(self, dmp: DistributedModelParallel) -> None:
        super().__init__()
        self.dmp = dmp

    @property
    def inner(self) -> DLRM:
        """The DLRM inside DMP and DDP (its sharded collection included)."""
        return self.dmp.module

    @property
    def sparse_arch(self) -> ShardedTables:
        return self.inner.sparse_arch

    def dense_parameters(self) -> list[nn.Parameter]:
        return self.inner.dense_parameters()

    def to(self, *args, **kwargs) -> DistributedDLRM:
        return self  # DMP placed every shard and replica at construction

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        return self.dmp(dense, sparse)


def plan(
    model: nn.Module,
    sharders: list,
    device: torch.device,
    types: list[str] | None,
    batch_size: int,
    memory_bytes: int | None = None,
) -> ShardingPlan:
    """torchrec's plan for `model`'s collection (`types`: the ShardingType values allowed, None:
    any; `memory_bytes`: what each rank may hold, host RAM on CPU or GPU memory on CUDA, None:
    torchrec's default), made on rank 0 alone and broadcast. A planning error (e.g. a table larger than a rank's
    memory) is broadcast instead and raised on every rank as one ConfigError line."""
    result = None
    if distributed.is_main():
        try:
            cap = {} if memory_bytes is None else {"hbm_cap" if device.type == "cuda" else "ddr_cap": memory_bytes}
            topology = Topology(
                world_size=distributed.world_size(),
                compute_device=device.type,
                local_world_size=_local_world_size(),
                **cap,
            )
            constraints = None
            if types is not None:
                names = model.sparse_arch.table_features
                constraints = {name: ParameterConstraints(sharding_types=list(types)) for name in names}
            planner = EmbeddingShardingPlanner(
                topology=topology, batch_size=batch_size, constraints=constraints, debug=False
            )
            result = planner.plan(model, sharders)
        except Exception as e:  # noqa: BLE001 - any planner failure is sent to all ranks as text
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            result = f"sharding plan failed ({type(e).__name__}): {first}"
    result = distributed.broadcast_object(result)
    if isinstance(result, str):
        raise ConfigError(result)
    return result


def _local_world_size() -> int:
    """Processes per node, as torchrun sets it (the planner's topology)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))


def wrap(model: DLRM, cfg: DictConfig, device: torch.device) -> DistributedDLRM:
    """`model` with its tables sharded by DMP over the process group (see module doc).

    Raises ConfigError (every rank, same line) for emb=cached, a bad emb.sharding, an optimizer
    fbgemm cannot fuse, or a plan that cannot be made; RuntimeError if torchrec's gradient
    division was turned off in this process (see dlrm/distributed/tables.py, "Gradients")."""
    types = sharding_types(str(cfg.emb.get("sharding", "auto")), device)
    if not comm_ops.get_gradient_division():
        # Our tables' gradients are right only with torchrec's 1/world-size division in its
        # output all-to-all's backward (its default); someone turned it off in this process.
        raise RuntimeError(
            "torchrec.distributed.comm_ops.set_gradient_division(False) is in effect: sharded tables "
            "would get world-size times their gradient; leave it at torchrec's default (True)"
        )
    tables = ShardedTables(model.sparse_arch, cfg.optim.sparse, str(cfg.emb.get("pooling", "sum")))
    model.sparse_arch = tables
    if tables.ebc is None:  # tt alone: nothing to shard; DMP still wraps the model in DDP
        dmp = DistributedModelParallel(model.to(device), device=device, plan=ShardingPlan({}), sharders=[])
        return DistributedDLRM(dmp)
    sharders = [EmbeddingBagCollectionSharder()]
    memory_gb = cfg.emb.get("rank_memory_gb")
    memory = None if memory_gb is None else int(float(memory_gb) * 2**30)
    try:
        the_plan = plan(model, sharders, device, types, int(cfg.trainer.batch_size), memory)
    except ConfigError as e:  # name the keys that shape the plan
        raise ConfigError(
            f"{e} (emb.sharding={cfg.emb.get('sharding', 'auto')}, emb.rank_memory_gb={memory_gb})"
        ) from None
    dmp = DistributedModelParallel(model, device=device, plan=the_plan, sharders=sharders)
    module_plan = the_plan.plan[EBC_PREFIX.rstrip(".")]
    placed = {name: ps.sharding_type for name, ps in module_plan.items()}
    text = "sharding: " + ", ".join(
        f"{name} {kind} ranks {module_plan[name].ranks}" for name, kind in placed.items()
    )
    tables = dmp.module.sparse_arch
    tables.set_plan(text)
    tables.load_initial_weights(dmp.module.state_dict())
    log.info("%s", text)
    return DistributedDLRM(dmp)

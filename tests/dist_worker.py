"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (one launch for all cases):

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py DATA OUT.json [--precision bf16|fp64] BACKEND...

1. Before joining the process group, each rank trains its share of the backends (rank r: every
   2nd from the r-th) as a plain single-process model on the whole global batch: the 1-process
   references, computed in parallel and in processes that belong to no group (as
   `python -m dlrm.train` runs).
2. Joined (gloo), per backend: the same model (same seed) wrapped by DMP, each rank training on
   its half of the same global batches; then evaluated through ParquetLoader's rank sharding
   (pad=True) and EvalMetrics' sync.
3. What cannot run distributed (emb=cached, emb.sharding=row_wise, a plan that cannot fit): the
   ConfigError text of every rank, gathered after it (no rank hung).

Global batch g of size 2B: one process takes all of it, rank r of two takes rows [rB, (r+1)B).
Rank 0 writes OUT.json: {"backends": {name: {"one": ..., "two": ...}}, "refusals": {case: [msg per rank]}}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from dlrm import distributed
from dlrm.build import build_model
from dlrm.config import ConfigError
from dlrm.data.loader import ParquetLoader
from dlrm.data.schema import SPARSE
from dlrm.metrics import EvalMetrics
from dlrm.train import exit_without_teardown
from dlrm.trainer import dense_optimizer

ROOT = Path(__file__).resolve().parents[1]
B = 64  # rows per rank per step
STEPS = 20
BACKENDS = {
    "full": ["emb=full"],
    "hashed": ["emb=hashed", "compression=4", "emb.min_rows=100"],
    "qr": ["emb=qr", "compression=4", "emb.min_rows=100"],
    "tt": ["emb=tt", "emb.min_rows=1000", "rank=4"],
    "full_dp": ["emb=full", "emb.sharding=data_parallel"],
    "full_cw": ["emb=full", "emb.sharding=column_wise"],
    "full_tw": ["emb=full", "emb.sharding=table_wise"],
    # SGD's table step is proportional to the gradient (row-wise Adagrad's nearly is not): a
    # wrong gradient scale on sharded tables shows here.
    "full_sgd": ["emb=full", "emb.sharding=table_wise", "optim.sparse.name=sgd", "~optim.sparse.eps"],
}
REFUSALS = {
    "cached": ["emb=cached"],
    "row_wise": ["emb=full", "emb.sharding=row_wise"],
    # tables of ~2 MB against 0.5 MB per rank: rank 0's planning error must reach both ranks
    "too_big": ["emb=full", "emb.rank_memory_gb=0.0005"],
}


def config(overrides: list[str], precision: str = "fp32"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[*overrides, "model.bottom_mlp=[32,16]", "model.top_mlp=[32,1]",
                       f"trainer.precision={precision}", "optim.sparse.lr=0.05"],
        )


def evaluate(model, data: Path, env) -> float:
    model.eval()
    loader = ParquetLoader(data, "eval", batch_size=500, shuffle=False, rank=env.rank,
                           world_size=env.world_size, pad=True)
    metrics = EvalMetrics()
    with torch.no_grad():
        for batch in loader.epoch(0):
            metrics.update(model(batch.dense, batch.sparse), batch.labels)
    model.train()
    return metrics.compute()["auc"]


def table_weights(model, env) -> dict[str, list[torch.Tensor]]:
    """{table: this rank's pieces of its weights} counting each row once over ranks: sharded
    tables' local shards; a data-parallel (replicated) table on rank 0 only; one process: all."""
    if not env.distributed:
        out = {}
        for part in getattr(model.sparse_arch, "parts", [model.sparse_arch]):
            if hasattr(part, "tbe"):
                physical = part.tables if part.name == "full" else part.physical_tables
                out.update({t.name: [w] for t, w in zip(physical, part.tbe.split_embedding_weights())})
        return out
    out = {}
    for key, value in model.dmp.module.state_dict().items():
        if ".embedding_bags." in key:
            name = key.split(".")[-2]
            if hasattr(value, "local_shards"):
                out[name] = [s.tensor for s in value.local_shards()]
            else:
                out[name] = [value] if env.rank == 0 else []
    return out


def replicated_tensors(model) -> dict[str, torch.Tensor]:
    """Every state_dict tensor DMP did not shard (MLPs, TT cores, data-parallel tables)."""
    state = model.dmp.module.state_dict()
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor) and not hasattr(v, "local_shards")}


def dense_in_fp64(model) -> None:
    """Run everything after the lookup in fp64 (`--precision fp64`): the losses of 1 and 2 processes
    then differ by what fp32 summation order leaves in the tables' updates alone."""
    from dlrm.model import _PairwiseDots

    model.dense_arch.double()
    model.over_arch.double()

    def dense_forward(dense, embedded):
        d = model.dense_arch(dense.double())
        t = torch.cat([d.unsqueeze(1), embedded.double()], dim=1)
        x = torch.cat([d, _PairwiseDots.apply(t, model.inter_arch.flat_index, model.inter_arch.sym_index)], dim=1)
        return model.over_arch(x).squeeze(1)

    model.dense_forward = dense_forward


def run(name: str, data: Path, env, precision: str) -> dict:
    cfg = config(BACKENDS[name], "fp32" if precision == "fp64" else precision)
    torch.manual_seed(cfg.seed)
    loader = ParquetLoader(data, "train", batch_size=2 * B, shuffle=False)
    cardinalities = {f: loader.cardinalities[f] for f in SPARSE}
    model = build_model(cfg, cardinalities, torch.device("cpu"), loader.dense_width)
    if precision == "fp64":
        dense_in_fp64(model)
    if env.distributed:
        from dlrm.distributed.model import wrap

        model = wrap(model, cfg, torch.device("cpu"))
    optimizers = [dense_optimizer(model.dense_parameters(), cfg.optim.dense), *model.sparse_arch.optimizers()]
    auc_init = evaluate(model, data, env)
    initial = {t: [w.detach().clone() for w in ws] for t, ws in table_weights(model, env).items()}
    losses = []
    for step, batch in zip(range(STEPS), loader.epoch(0)):
        if env.distributed:  # this rank's half of the global batch, ids as a KJT of B rows
            lo, hi = env.rank * B, (env.rank + 1) * B
            sparse = batch.sparse.to_dict()
            kjt = KeyedJaggedTensor.from_jt_dict({k: _rows(sparse[k], lo, hi) for k in SPARSE})
            dense, labels = batch.dense[lo:hi], batch.labels[lo:hi]
        else:
            kjt, dense, labels = batch.sparse, batch.dense, batch.labels
        logits = model(dense, kjt)
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(float(distributed.all_reduce_sum(loss.detach().clone())) / env.world_size)
    # Per table, the sum of squared weight changes over all its rows (each counted once).
    names = sorted(initial)
    final = table_weights(model, env)
    sq = torch.tensor([sum(float(((w - w0).double() ** 2).sum()) for w, w0 in zip(final[t], initial[t])) for t in names],
                      dtype=torch.float64)
    result = {
        "losses": losses,
        "auc_init": auc_init,
        "auc_final": evaluate(model, data, env),
        "table_update_sq": dict(zip(names, distributed.all_reduce_sum(sq).tolist())),
    }
    if env.distributed:
        replicas = distributed.gather_object(replicated_tensors(model))
        result["replicated"] = sorted(replicas[0])
        result["replicas_equal"] = all(
            r.keys() == replicas[0].keys() and all(torch.equal(replicas[0][k], r[k]) for k in r) for r in replicas
        )
        result["describe"] = model.sparse_arch.describe()
    return result


def refusal(overrides: list[str], data: Path, env) -> str:
    """The ConfigError this rank raises preparing a distributed run of `overrides` ('' if none)."""
    from dlrm.distributed.model import wrap
    from dlrm.distributed.run import prepare

    cfg = config(overrides)
    try:
        prepare(cfg, torch.device("cpu"), Path("."))  # refuses emb=cached
        loader = ParquetLoader(data, "train", batch_size=B)
        model = build_model(cfg, {f: loader.cardinalities[f] for f in SPARSE}, torch.device("cpu"), loader.dense_width)
        wrap(model, cfg, torch.device("cpu"))
    except ConfigError as e:
        return str(e)
    return ""


def _rows(jt, lo: int, hi: int):
    """Rows lo..hi of a JaggedTensor (a KJT feature)."""
    lengths, offsets = jt.lengths(), jt.offsets()
    return JaggedTensor(values=jt.values()[offsets[lo] : offsets[hi]], lengths=lengths[lo:hi])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp64"],
                   help="trainer.precision; fp64: MLPs and interaction in float64, tables fp32")
    p.add_argument("--no-refusals", action="store_true")
    p.add_argument("backends", nargs="+", choices=sorted(BACKENDS))
    args = p.parse_args()
    torch.set_num_threads(1)
    env = distributed.from_environ()
    if not env.distributed:
        raise SystemExit("run under torchrun --nproc_per_node=2")
    single = distributed.Env()  # rank 0 of 1: no process group joined yet
    mine = {name: run(name, args.data, single, args.precision) for name in args.backends[env.rank :: env.world_size]}
    env = distributed.init("cpu")
    ones = {k: v for part in distributed.gather_object(mine) for k, v in part.items()}
    backends = {name: {"one": ones[name], "two": run(name, args.data, env, args.precision)} for name in args.backends}
    refusals = {}
    if not args.no_refusals:
        refusals = {case: distributed.gather_object(refusal(o, args.data, env)) for case, o in REFUSALS.items()}
    if distributed.is_main():
        args.out.write_text(json.dumps({"backends": backends, "refusals": refusals}))
    distributed.shutdown()
    # End as `python -m dlrm.train` does, without the interpreter's teardown: twice in ~20 full
    # runs both ranks aborted with "terminate called without an active exception" (a C++ thread
    # destroyed while joinable), which the trainer's own exit never meets.
    exit_without_teardown()


if __name__ == "__main__":
    main()

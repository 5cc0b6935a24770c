"""Run by tests/test_distributed.py, as `python tests/dist_worker.py DATA OUT BACKEND...` (one
process) or under `torchrun --nproc_per_node=2` (two): per backend, the same model (same seed)
trained on the same global batches, then evaluated; rank 0 writes OUT/<backend>.json.

Global batch g of size 2B: one process takes all of it, rank r of two takes rows [rB, (r+1)B).
The eval goes through ParquetLoader's rank sharding (pad=True) and EvalMetrics' sync.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from dlrm import distributed
from dlrm.build import build_model
from dlrm.data.loader import ParquetLoader
from dlrm.data.schema import SPARSE
from dlrm.metrics import EvalMetrics
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
    "full_sgd": ["emb=full", "emb.sharding=table_wise", "optim.sparse.name=sgd", "~optim.sparse.eps"],
}


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[*overrides, "model.bottom_mlp=[32,16]", "model.top_mlp=[32,1]", "trainer.precision=fp32",
                       "optim.sparse.lr=0.05"],
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


def run(name: str, data: Path, env) -> dict:
    cfg = config(BACKENDS[name])
    torch.manual_seed(cfg.seed)
    loader = ParquetLoader(data, "train", batch_size=2 * B, shuffle=False)
    cardinalities = {f: loader.cardinalities[f] for f in SPARSE}
    model = build_model(cfg, cardinalities, torch.device("cpu"), loader.dense_width)
    if env.distributed:
        from dlrm.distributed.model import wrap

        model = wrap(model, cfg, torch.device("cpu"))
    optimizers = [dense_optimizer(model.dense_parameters(), cfg.optim.dense), *model.sparse_arch.optimizers()]
    auc_init = evaluate(model, data, env)
    losses = []
    for step, batch in zip(range(STEPS), loader.epoch(0)):
        if env.distributed:  # this rank's half of the global batch, ids as a KJT of B rows
            lo, hi = env.rank * B, (env.rank + 1) * B
            sparse = batch.sparse.to_dict()
            kjt = KeyedJaggedTensor.from_jt_dict({k: _rows(sparse[k], lo, hi) for k in SPARSE})
            dense, labels = batch.dense[lo:hi], batch.labels[lo:hi]
        else:
            kjt, dense, labels = batch.sparse, batch.dense, batch.labels
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(float(distributed.all_reduce_sum(loss.detach().clone())) / env.world_size)
    dense = torch.cat([p.detach().reshape(-1) for p in model.dense_parameters()])
    replicas = distributed.gather_object(dense)
    return {
        "losses": losses,
        "auc_init": auc_init,
        "auc_final": evaluate(model, data, env),
        "replicas_equal": all(torch.equal(replicas[0], r) for r in replicas),
        "describe": model.sparse_arch.describe(),
    }


def _rows(jt, lo: int, hi: int):
    """Rows lo..hi of a JaggedTensor (a KJT feature)."""
    lengths, offsets = jt.lengths(), jt.offsets()
    return JaggedTensor(values=jt.values()[offsets[lo] : offsets[hi]], lengths=lengths[lo:hi])


def main() -> None:
    data, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    env = distributed.init("cpu")
    for name in names:
        result = run(name, data, env)
        if distributed.is_main():
            (out / f"{name}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main()

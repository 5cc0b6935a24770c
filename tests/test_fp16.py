"""emb.weights_precision=fp16 (emb=fp16): fp16 rows, fp32 lookups, exact bytes, rounding, training."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.tables import row_bytes, tbe_bytes
from dlrm.train import run

CPU = torch.device("cpu")
SGD = OmegaConf.create({"name": "sgd", "lr": 0.1})
ADAGRAD = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
TABLES = [TableSpec("t_C1", 1000, 8, ("C1",)), TableSpec("t_C2", 37, 8, ("C2",))]


def single_hot(ids: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    values = torch.cat(list(ids.values()))
    return KeyedJaggedTensor.from_lengths_sync(keys=list(ids), values=values, lengths=torch.ones_like(values))


def build(name: str, optim=SGD, **kw):
    return build_embeddings(TABLES, OmegaConf.create({"name": name, "dim": 8, **kw}), optim, CPU)


def test_fp16_rows_start_as_the_full_rows_rounded_and_look_up_in_fp32():
    torch.manual_seed(0)
    full = build("full")
    torch.manual_seed(0)
    half = build("fp16")
    for w32, w16 in zip(full.tbe.split_embedding_weights(), half.tbe.split_embedding_weights()):
        assert w16.dtype == torch.float16 and torch.equal(w16, w32.half())
    batch = single_hot({"C1": torch.tensor([3, 999, 3]), "C2": torch.tensor([0, 36, 5])})
    out = half(batch)
    assert out.values().dtype == torch.float32
    w1, w2 = half.tbe.split_embedding_weights()
    assert torch.equal(out["C1"], w1[[3, 999, 3]].float()) and torch.equal(out["C2"], w2[[0, 36, 5]].float())


@pytest.mark.parametrize("optim", [SGD, ADAGRAD], ids=["sgd", "rowwise_adagrad"])
def test_embedding_bytes_are_exact(optim):
    for name, precision in (("full", "fp32"), ("fp16", "fp16")):
        emb = build(name, optim)
        by_tensors = sum(w.numel() * w.element_size() for w in emb.tbe.split_embedding_weights())
        by_tensors += sum(s.numel() * s.element_size() for st in emb.tbe.split_optimizer_states() for s in st)
        assert emb.embedding_bytes() == tbe_bytes(emb.tbe) == by_tensors
        assert by_tensors == sum(t.rows for t in TABLES) * row_bytes(8, optim.name, precision)
    # dim 16, row-wise Adagrad: (16 * 4 + 4) / (16 * 2 + 4) = 1.89x
    assert row_bytes(16, "rowwise_adagrad", "fp32") / row_bytes(16, "rowwise_adagrad", "fp16") == pytest.approx(68 / 36)


def test_sgd_update_rounds_in_fp16():
    """fbgemm's CPU kernel rounds the update to fp16, then adds in fp16: w <- fp16(w - fp16(lr g)),
    so an update below half an fp16 ulp of the weight is lost (documented in tables.py)."""
    emb = build("fp16")
    w = emb.tbe.split_embedding_weights()[0]
    ids = torch.arange(1000)
    before = w.clone()
    out = emb(single_hot({"C1": ids, "C2": torch.zeros(1000, dtype=torch.int64)}))
    grad = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1)) * 1e-3
    out.values().backward(torch.cat([grad, torch.zeros(1000, 8)], 1))  # C1's block only
    expected = before - (0.1 * grad).half()  # fp16 arithmetic rounds to nearest
    assert torch.equal(w, expected)
    # an update far below the weight's ulp does not move it
    assert not torch.equal(w, (before.float() - 0.1 * grad).half())


def test_other_precisions_and_backends_fail_naming_the_key():
    with pytest.raises(ValueError, match=r"emb.weights_precision='int8'.*int8 rows do not train"):
        build("full", weights_precision="int8")
    cfg = OmegaConf.create({"name": "tt", "dim": 8, "weights_precision": "fp16", "min_rows": 0, "rank": 2})
    with pytest.raises(ValueError, match="emb.weights_precision=fp16: emb=tt keeps its rows in fp32"):
        build_embeddings(TABLES, cfg, SGD, CPU)


@pytest.mark.parametrize("backend", [["emb=fp16"], ["emb=hashed", "emb.min_rows=500", "emb.weights_precision=fp16"]])
def test_fp16_trains(backend, compose_cfg, tiny_dataset, tmp_path):
    results = run(compose_cfg(*backend, "trainer.max_steps=60"), tmp_path)
    assert results["auc"] > 0.6
    assert results["backend"] == backend[0].split("=")[1]

"""DLRM shapes and the `full` backend's contract: fused sparse updates, bytes, id checks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.model import DLRM, resolve_precision

SGD = OmegaConf.create({"name": "sgd", "lr": 0.5})
FULL = OmegaConf.create({"name": "full", "dim": 4, "pooling": "sum", "check_ids": True})
TABLES = [TableSpec("t_a", 50, 4, ("a",)), TableSpec("t_b", 7, 4, ("b",))]


def kjt(a_ids, b_ids):
    return KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor(a_ids + b_ids),
        lengths=torch.ones(len(a_ids) + len(b_ids), dtype=torch.long),
    )


def make_model(tables=TABLES, precision="fp32"):
    emb = build_embeddings(tables, FULL, SGD, torch.device("cpu"))
    return DLRM(emb, dense_in=13, bottom_mlp=[8, 4], top_mlp=[8, 1], precision=precision)


def test_forward_shapes_and_parameter_split():
    model = make_model()
    logits = model(torch.rand(3, 13), kjt([1, 2, 3], [0, 6, 6]))
    assert logits.shape == (3,) and logits.dtype == torch.float32
    dense_ids = {id(p) for p in model.dense_parameters()}
    assert not dense_ids & {id(p) for p in model.sparse_arch.parameters()}
    assert dense_ids == {id(p) for n, p in model.named_parameters() if not n.startswith("sparse_arch")}


def test_bf16_autocast_keeps_fp32_logits():
    model = make_model(precision="bf16")
    assert model(torch.rand(2, 13), kjt([1, 2], [0, 1])).dtype == torch.float32


def test_fused_update_touches_only_used_rows_and_no_dense_grad():
    model = make_model()
    before = [w.clone() for w in model.sparse_arch.tbe.split_embedding_weights()]
    logits = model(torch.rand(2, 13), kjt([3, 3], [5, 1]))
    logits.sum().backward()
    after = model.sparse_arch.tbe.split_embedding_weights()
    changed_a = (before[0] != after[0]).any(1).nonzero().flatten().tolist()
    changed_b = (before[1] != after[1]).any(1).nonzero().flatten().tolist()
    assert changed_a == [3] and changed_b == [1, 5]
    # the table never gets a rows-sized gradient: updates happen inside backward
    assert all(p.grad is None for p in model.sparse_arch.parameters())


def test_table_init_is_not_zero():
    emb = build_embeddings([TableSpec("t", 10_000, 4, ("a",))], FULL, SGD, torch.device("cpu"))
    w = emb.tbe.split_embedding_weights()[0]
    assert w.abs().max() <= 0.01 + 1e-7 and w.std() > 0.004  # U(-1/sqrt(n), 1/sqrt(n))


def test_embedding_bytes_count_weights_and_optimizer_state():
    sgd = build_embeddings(TABLES, FULL, SGD, torch.device("cpu"))
    assert sgd.embedding_bytes() == (50 + 7) * 4 * 4
    rw = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1})
    adagrad = build_embeddings(TABLES, FULL, rw, torch.device("cpu"))
    assert adagrad.embedding_bytes() == (50 + 7) * 4 * 4 + (50 + 7) * 4  # + one fp32 per row
    assert adagrad.full_bytes() == adagrad.embedding_bytes()


def test_out_of_range_id_names_the_feature():
    emb = build_embeddings(TABLES, FULL, SGD, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"feature b: ids must be in \[0, 7\)"):
        emb(kjt([1, 2], [3, 7]))
    with pytest.raises(ValueError, match="feature a"):
        emb(kjt([-1, 2], [3, 4]))


def test_bad_model_shapes():
    emb = build_embeddings(TABLES, FULL, SGD, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"model.bottom_mlp\[-1\]=8 must equal emb.dim=4"):
        DLRM(emb, 13, [16, 8], [8, 1])
    with pytest.raises(ValueError, match="optim.sparse.name='adam'"):
        build_embeddings(TABLES, FULL, OmegaConf.create({"name": "adam", "lr": 1}), torch.device("cpu"))


def test_auto_precision_is_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setattr("dlrm.model.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr("dlrm.model.cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"

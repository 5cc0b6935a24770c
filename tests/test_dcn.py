"""`model=dcnv2`: DLRM-DCNv2's cross network, its equality with torchrec's InteractionDCNArch,
per-feature dims, and a few training steps with every backend from the command line's config."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torchrec.models.dlrm import InteractionDCNArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.config import validate
from dlrm.dcn import DLRMDCN
from dlrm.embeddings import EmbeddingBackend, TableSpec, build_embeddings
from dlrm.train import run

from conftest import CONF_DIR

SGD = OmegaConf.create({"name": "sgd", "lr": 0.5})
FULL = OmegaConf.create({"name": "full", "dim": 4, "pooling": "sum", "check_ids": True})
TABLES = [TableSpec("t_a", 50, 4, ("a",)), TableSpec("t_b", 7, 4, ("b",))]


def kjt(a_ids, b_ids):
    return KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor(a_ids + b_ids), lengths=torch.ones(len(a_ids) + len(b_ids), dtype=torch.long)
    )


def test_cross_network_equals_torchrecs_interaction_dcn_arch():
    torch.manual_seed(0)
    emb = build_embeddings(TABLES, FULL, SGD, torch.device("cpu"))
    model = DLRMDCN(emb, dense_in=13, bottom_mlp=[8, 4], top_mlp=[8, 1], cross_layers=2, low_rank=3)
    dense, ids = torch.rand(5, 13), kjt([1, 2, 3, 4, 49], [0, 6, 6, 1, 2])
    ours = model(dense, ids)
    reference_arch = InteractionDCNArch(num_sparse_features=2, crossnet=model.crossnet)
    embedded = emb(ids).values().view(5, 2, 4)
    reference = model.over_arch(reference_arch(model.dense_arch(dense), embedded)).squeeze(1)
    assert ours.shape == (5,)
    torch.testing.assert_close(ours, reference)


class _MixedDims(EmbeddingBackend):
    """Two features of different dims (as mixed-dimension embeddings give): DCN needs no equal dims."""

    name = "mixed"

    def __init__(self):
        super().__init__([TableSpec("t_a", 10, 3, ("a",)), TableSpec("t_b", 10, 5, ("b",))])
        self.a, self.b = torch.nn.EmbeddingBag(10, 3), torch.nn.EmbeddingBag(10, 5)

    def forward(self, features):
        f = features.to_dict()
        a = self.a(f["a"].values().view(-1, 1))  # one id per row
        b = self.b(f["b"].values().view(-1, 1))
        return KeyedTensor(keys=["a", "b"], length_per_key=[3, 5], values=torch.cat([a, b], 1))

    def embedding_bytes(self):
        return 4 * (30 + 50)


def test_features_of_different_dims_train():
    model = DLRMDCN(_MixedDims(), dense_in=13, bottom_mlp=[8, 6], top_mlp=[8, 1], cross_layers=1, low_rank=2)
    assert model.crossnet.W_kernels[0].shape == (6 + 3 + 5, 2)
    logits = model(torch.rand(4, 13), kjt([1, 2, 3, 4], [0, 6, 6, 1]))
    logits.sum().backward()
    assert model.sparse_arch.b.weight.grad is not None and logits.shape == (4,)


@pytest.mark.parametrize(
    "overrides",
    [("emb=full",), ("emb=tt", "rank=4", "emb.min_rows=1000"), ("emb=hashed", "emb.min_rows=1000"),
     ("emb=qr", "emb.min_rows=1000"), ("emb=cached", "emb.min_rows=1000")],
)
def test_dcnv2_trains_with_every_backend(compose_cfg, tiny_dataset, tmp_path, overrides):
    cfg = compose_cfg("model=dcnv2", "model.bottom_mlp=[32,16]", "model.top_mlp=[32,1]", "model.low_rank=8",
                      "trainer.max_steps=8", *overrides)
    results = run(cfg, tmp_path)
    assert results["model"] == "dcnv2" and results["steps"] == 8
    assert 0 < results["auc"] < 1


def test_mlperf_shapes_compose():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=dcnv2_mlperf", "data.root=/x"])
    validate(cfg)
    assert cfg.model.name == "dcnv2" and list(cfg.model.top_mlp) == [1024, 1024, 512, 256, 1]
    assert cfg.emb.dim == 128 and cfg.model.bottom_mlp[-1] == 128 and cfg.model.low_rank == 512
    assert cfg.data.multi_hot["C21"] == 100 and cfg.data.max_rows == 40_000_000

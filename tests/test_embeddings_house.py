"""The embeddings package as a newcomer meets it: every emb.* choice checked in validate() before
any data work, a toy backend added with one module and one registry line, the training seed
reaching the cache's random choices, one name per table, runtime facts as arguments, and no
import cycles in dlrm/."""

from __future__ import annotations

import ast
import importlib
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.build import build_model
from dlrm.checkpoint import check_config
from dlrm.config import ConfigError, validate
from dlrm.embeddings import BACKENDS, Runtime, TableSpec, build_embeddings
from dlrm.embeddings.base import per_table
from dlrm.embeddings.cached.disk import hash_init, read_disk_table
from dlrm.embeddings.hashed import HashedEmbeddings
from dlrm.train import run

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SGD = OmegaConf.create({"name": "sgd", "lr": 0.1})


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_shipped_backend_config_validates(compose_cfg, backend):
    validate(compose_cfg(f"emb={backend}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["emb=cached", "emb.store=ssd"], r"emb.store='ssd': choose one of \['host', 'disk', 'tt'\]"),
        (["emb=cached", "emb.policy=fifo"], r"emb.policy='fifo': choose one of"),
        (["emb=cached", "emb.warm_start=yes"], r"emb.warm_start='yes': choose one of"),
        (["emb=cached", "emb.cache_fraction=lots"], r"emb.cache_fraction='lots' must be a number"),
        (["emb=cached", "emb.evict_sample=-1"], r"emb.evict_sample=-1 must be >= 0"),
        (["emb=cached", "emb.tt.optimizer=adam"], r"emb.tt.optimizer='adam': choose one of"),
        (["emb.pooling=max"], r"emb.pooling='max': choose one of \['sum', 'mean'\]"),
        (["emb=qr", "emb.combiner=max"], r"emb.combiner='max': choose one of"),
        (["emb=tt", "emb.optimizer=adam"], r"emb.optimizer='adam': choose one of \['adagrad', 'sgd'\]"),
        (["emb=tt", "emb.cores=three"], r"emb.cores='three' must be an integer"),
        (["emb=hashed", "emb.hash_seed=-1"], r"emb.hash_seed=-1 must be >= 0"),
        (["emb=hashed", "emb.min_rows=many"], r"emb.min_rows='many' must be an integer"),
        (["emb=hashed", "+emb.compresion=4"], r"emb.compresion: unknown option \(did you mean emb.compression\?\)"),
        (["emb=full", "+emb.min_rows=10"], r"emb.min_rows: unknown option"),
        (["emb=full", "emb.name=fancy"], r"emb.name='fancy': choose one of"),
        (["emb=full", "emb.check_ids=maybe"], r"emb.check_ids='maybe' must be true or false"),
    ],
)
def test_a_bad_emb_option_fails_in_validate_before_any_data_work(compose_cfg, tmp_path, overrides, message):
    cfg = compose_cfg(*overrides)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path)
    assert time.perf_counter() - start < 5  # seconds, not the minutes of data generation
    assert not list(tmp_path.iterdir())


TOY = '''
"""A toy backend: one torch EmbeddingBag per table, trained by a plain optimizer."""
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from dlrm.embeddings.base import TABLE_OPTIONS, EmbeddingBackend, per_table
from dlrm.options import Opt


class ToyEmbeddings(EmbeddingBackend):
    name = "toy"
    options = {**TABLE_OPTIONS, "lr": Opt(float, min=0)}

    def __init__(self, tables, cfg, optim, device, runtime=None):
        super().__init__(tables)
        cfg = self.settings(cfg)
        self.bags = torch.nn.ModuleList(
            torch.nn.EmbeddingBag(t.rows, t.dim, mode=cfg.pooling) for t in self.tables
        )
        self.opt = torch.optim.SGD(self.bags.parameters(), lr=cfg.lr)

    def forward(self, features):
        blocks = []
        for bag, (t, ids, offsets) in zip(self.bags, per_table(self.tables, features)):
            pooled = bag(ids, offsets[:-1])  # [n_features * B, dim]
            blocks.extend(pooled.view(len(t.features), -1, t.dim).unbind(0))
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=torch.cat(blocks, 1))

    def embedding_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def optimizers(self):
        return [self.opt]
'''


def test_a_toy_backend_is_one_module_and_one_registry_line(compose_cfg, tiny_dataset, tmp_path, monkeypatch):
    (tmp_path / "toy_backend.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = importlib.import_module("toy_backend")
    monkeypatch.setitem(BACKENDS, "toy", toy.ToyEmbeddings)  # the one registry line

    cfg = compose_cfg("emb.name=toy", "+emb.lr=0.05", "trainer.max_steps=8")
    results = run(cfg, tmp_path / "out")
    assert results["backend"] == "toy" and results["steps"] == 8
    assert 0 < results["auc"] < 1 and results["compression_ratio"] == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ConfigError, match=r"emb.lr=-1 must be >= 0"):
        validate(compose_cfg("emb.name=toy", "+emb.lr=-1"))
    sys.modules.pop("toy_backend")


def test_the_training_seed_reaches_the_cache_eviction_sampler(compose_cfg):
    cfg = compose_cfg("emb=cached", "emb.min_rows=1000", "seed=7")
    model = build_model(cfg, {"C1": 5000, "C2": 100}, CPU)
    cached = model.sparse_arch.parts[0]
    assert cached.name == "cached" and cached._rng.initial_seed() == 7
    again = build_embeddings(cached.tables, cfg.emb, cfg.optim.sparse, CPU, Runtime(seed=8))
    assert again._rng.initial_seed() == 8


def test_the_training_seed_reaches_a_disk_stores_lazy_init(tmp_path):
    tables = [TableSpec("t_a", rows=500, dim=4, features=("a",))]
    cfg = OmegaConf.create({"name": "cached", "dim": 4, "store": "disk", "cache_rows": 20, "min_rows": 1})
    optim = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
    rows = {}
    for seed in (1, 2):
        emb = build_embeddings(tables, cfg, optim, CPU, Runtime(seed=seed, store_dir=tmp_path / str(seed)))
        emb.flush()
        rows[seed] = read_disk_table(tmp_path / str(seed) / "emb_store", "t_a")[0]
        np.testing.assert_array_equal(rows[seed][100:], hash_init(0, torch.arange(100, 500), 4, 500, seed).numpy())
    assert not np.array_equal(rows[1], rows[2])


def test_tables_are_named_by_feature_and_the_t_names_still_work_with_a_warning():
    tables = [TableSpec("t_C3", rows=1000, dim=4, features=("C3",))]
    cfg = OmegaConf.create({"dim": 4, "compression": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HashedEmbeddings(tables, OmegaConf.merge(cfg, {"buckets": {"C3": 7}}), SGD, CPU).buckets == [7]
    with pytest.warns(FutureWarning, match=r"emb.buckets.t_C3: name tables by their feature \(C3\)"):
        assert HashedEmbeddings(tables, OmegaConf.merge(cfg, {"buckets": {"t_C3": 7}}), SGD, CPU).buckets == [7]


def test_a_disk_store_lives_where_the_runtime_says_and_reopens_only_when_resuming(tmp_path):
    tables = [TableSpec("t_a", rows=500, dim=4, features=("a",))]
    cfg = OmegaConf.create({"name": "cached", "dim": 4, "store": "disk", "cache_rows": 20, "min_rows": 1})
    optim = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
    emb = build_embeddings(tables, cfg, optim, CPU, Runtime(store_dir=tmp_path))
    emb.flush(step=3)
    assert (tmp_path / "emb_store" / "store.json").exists()
    with pytest.raises(ValueError, match="already holds a table store"):
        build_embeddings(tables, cfg, optim, CPU, Runtime(store_dir=tmp_path))
    again = build_embeddings(tables, cfg, optim, CPU, Runtime(store_dir=tmp_path, resuming=True))
    assert again.committed_step() == 3


def test_old_checkpoints_with_emb_resume_in_their_config_still_match():
    current = {"emb": {"name": "cached", "store": "disk", "path": None}, "seed": 1}
    old = {"emb": {"name": "cached", "store": "disk", "path": "/runs/a/emb_store", "resume": False}, "seed": 1}
    check_config(old, current, Path("step-10.pt"))  # no error: those keys were written by the run


def test_per_table_yields_each_tables_ids_and_rebased_offsets():
    tables = [TableSpec("t_a", 10, 4, ("a",)), TableSpec("t_b", 10, 4, ("b", "b2"))]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "b2"], torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([1, 0, 2, 1, 1, 1])
    )
    got = [(t.name, ids.tolist(), off.tolist()) for t, ids, off in per_table(tables, kjt)]
    assert got == [("t_a", [1], [0, 1, 1]), ("t_b", [2, 3, 4, 5, 6], [0, 2, 3, 4, 5])]


def _module_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the dlrm modules it imports at module level."""
    mods = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlrm"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dlrm")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycles_in_the_package():
    graph, cycles, done = _module_imports(ROOT / "dlrm"), [], set()

    def visit(node, path):
        for dep in graph[node]:
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for name in graph:
        if name not in done:
            visit(name, [name])
    assert not cycles

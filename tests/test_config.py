"""Every group's bad choice, type or range fails in `validate()`, before any data work, naming the key."""

from __future__ import annotations

import time

import pytest
from hydra import compose, initialize_config_dir

from dlrm.config import ConfigError, validate
from dlrm.options import Opt, check_options
from dlrm.train import run
from conftest import CONF_DIR


@pytest.mark.parametrize(
    "overrides",
    [("data.root=/x",), ("data=parquet", "data.path=/x"), ("data=criteo_kaggle", "data.path=/x"),
     ("data=criteo_1tb", "data.path=/x"), ("+experiment=compression", "data.root=/x"),
     ("+hparams_search=compression_pareto", "data.root=/x"),
     ("+hparams_search=lr_optuna", "data.root=/x")],
)
def test_every_shipped_config_validates(overrides):
    # the schemas know every key the YAML defines (a key missing there would be "unknown")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        validate(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    "overrides, key, value",
    [  # the per-table examples of the README and conf/emb/*.yaml, typed as shown (no `+`)
        (("emb=hashed", "emb.buckets={C3:100000}"), "buckets", {"C3": 100000}),
        (("emb=hybrid", "emb.hot_rows={C3:100000}", "emb.buckets={C3:50000}"), "hot_rows", {"C3": 100000}),
        (("emb=qr", "emb.m={C3:5000}"), "m", {"C3": 5000}),
        (("emb=mde", "emb.dims={C3:[16,8,4,4]}"), "dims", {"C3": [16, 8, 4, 4]}),
    ],
)
def test_per_table_overrides_compose_as_documented(compose_cfg, overrides, key, value):
    # a `{}` default would make Hydra refuse them (struct mode: "Key 'C3' is not in struct")
    cfg = compose_cfg(*overrides)
    validate(cfg)
    assert cfg.emb[key] == value


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.precision=bf61", r"trainer.precision='bf61': choose one of"),
        ("trainer.progress=maybe", r"trainer.progress='maybe' must be true or false"),
        ("trainer.eval_every=-1", r"trainer.eval_every=-1 must be >= 0"),
        ("+trainer.max_step=10", r"trainer.max_step: unknown option \(did you mean trainer.max_steps\?\)"),
        ("data.rows=0", r"data.rows=0 must be >= 1"),
        ("data.zipf=steep", r"data.zipf='steep' must be a number"),
        ("+data.row=5", r"data.row: unknown option"),
        ("model.top_mlp=5", r"model.top_mlp=5 must be a list"),
        ("optim.dense.name=adamw", r"optim.dense.name='adamw': choose one of \['adam', 'adagrad', 'sgd'\]"),
        ("optim.sparse.name=adam", r"optim.sparse.name='adam': choose one of"),
        ("optim.sparse.eps=-1", r"optim.sparse.eps=-1 must be >= 0"),
        ("compression=0.5", r"compression=0.5 must be >= 1"),
        ("+sed=3", r"sed: unknown option \(did you mean seed\?\)"),
    ],
)
def test_bad_option_fails_fast_naming_the_key(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg(override)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path)
    assert time.perf_counter() - start < 5  # before any data generation (seconds, not minutes)
    assert not list(tmp_path.iterdir())


def test_opt_rejects_bools_as_numbers_and_numbers_as_bool_choices():
    with pytest.raises(ConfigError, match="x=True must be an integer"):
        Opt(int).check("x", True)
    with pytest.raises(ConfigError, match=r"x=1: choose one of \['auto', True, False\]"):
        Opt(str, choices=("auto", True, False)).check("x", 1)
    Opt(str, choices=("auto", True, False)).check("x", False)
    check_options({"a": None}, {"a": Opt(int, nullable=True)}, "g")
    with pytest.raises(ConfigError, match="g.a=null: a value is required"):
        check_options({"a": None}, {"a": Opt(int)}, "g")

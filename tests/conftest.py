"""Shared fixtures: one tiny synthetic dataset per test session, and composed Hydra configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dlrm.data.synthetic import SyntheticSpec, ensure_dataset

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Small enough to generate in about a second, skewed enough for embeddings to matter.
TINY = dict(rows=30_000, eval_rows=8_000, max_cardinality=2_000, row_group_rows=4096)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_dataset(data_root) -> Path:
    return ensure_dataset(SyntheticSpec(**TINY), data_root)


def tiny_overrides(data_root: Path) -> list[str]:
    """Overrides that make `python -m dlrm.train` run in seconds on the tiny dataset."""
    return [
        f"data.root={data_root}",
        f"data.rows={TINY['rows']}",
        f"data.eval_rows={TINY['eval_rows']}",
        f"data.max_cardinality={TINY['max_cardinality']}",
        f"data.row_group_rows={TINY['row_group_rows']}",
        "trainer.batch_size=256",
        "trainer.max_steps=30",
        "trainer.progress=false",
        "trainer.threads=1",
        "trainer.log_every=5",
        "trainer.warmup_steps=2",
        "model.bottom_mlp=[64,16]",
        "model.top_mlp=[64,1]",
    ]


@pytest.fixture
def compose_cfg(data_root):
    """compose_cfg(*overrides) -> the app's config, as `python -m dlrm.train ...` would see it."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                "config", overrides=tiny_overrides(data_root) + list(overrides), return_hydra_config=False
            )

    return _compose


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """No C compiler (`CC=no-such-cc`) and an empty kernel cache: our C kernels cannot build. The
    kernels' cached loaders and warn-once messages forget what they did, before and after."""
    from dlrm.embeddings import table_native, tt_native
    from dlrm.kernels import build, dot_interaction, linear_relu

    caches = [table_native.library, dot_interaction.library, linear_relu.library, tt_native.library, build._warn_once]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-compiler-cache"))
    monkeypatch.setenv("CC", "no-such-cc")
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()

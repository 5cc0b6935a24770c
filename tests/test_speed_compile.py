"""trainer.compile: the key's values, the auto rule, compiled == eager, and the eager fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from dlrm import compile as compile_step
from dlrm.config import ConfigError, validate
from dlrm.train import run


def test_bad_value_is_one_config_error(compose_cfg):
    with pytest.raises(ConfigError, match=r"trainer.compile='maybe': choose one of"):
        validate(compose_cfg("trainer.compile=maybe"))
    for ok in ("trainer.compile=auto", "trainer.compile=true", "trainer.compile=false"):
        validate(compose_cfg(ok))


def test_auto_compiles_only_long_cpu_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    n = compile_step.AUTO_MIN_STEPS
    assert not compile_step.should_compile("auto", 1000, cpu)
    assert compile_step.should_compile("auto", n, cpu) and not compile_step.should_compile("auto", n, cuda)
    assert compile_step.should_compile(True, 10, cpu) and compile_step.should_compile("true", 10, cpu)
    assert not compile_step.should_compile(False, 10**6, cpu)
    with pytest.raises(ValueError, match="trainer.compile=1"):
        compile_step.should_compile(1, 10, cpu)


def test_auto_compiles_a_shorter_run_once_its_graph_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cpu, steps = torch.device("cpu"), compile_step.AUTO_MIN_STEPS_WARM
    assert not compile_step.should_compile("auto", steps, cpu, "abc")
    compile_step.mark_compiled("abc")
    assert compile_step.should_compile("auto", steps, cpu, "abc")
    assert not compile_step.should_compile("auto", steps - 1, cpu, "abc")
    assert not compile_step.should_compile("auto", steps, cpu, "other")


def test_cache_dir_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_step.cache_dir() == tmp_path / "dlrm" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "x"))
    assert compile_step.cache_dir() == tmp_path / "x"
    # inductor's own default, written there by inductor itself, is not the user's choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compile_step.cache_dir() == tmp_path / "dlrm" / "inductor"


def test_failed_compile_falls_back_to_eager_with_one_warning(compose_cfg, tiny_dataset, tmp_path, monkeypatch, caplog):
    def broken(model):
        def fail(*args):
            raise RuntimeError("inductor says no\nsecond line")

        model.compiled_dense_forward = fail
        return True

    monkeypatch.setattr(compile_step, "enable", broken)
    eager = run(compose_cfg("trainer.max_steps=6", "trainer.compile=false"), tmp_path / "eager")
    with caplog.at_level(logging.WARNING):
        fallback = run(compose_cfg("trainer.max_steps=6", "trainer.compile=true"), tmp_path / "fallback")
    warnings = [r for r in caplog.records if "trainer.compile" in r.getMessage()]
    assert len(warnings) == 1 and "inductor says no" in warnings[0].getMessage()
    assert "second line" not in warnings[0].getMessage()
    assert fallback["auc"] == eager["auc"] and fallback["logloss"] == eager["logloss"]  # same steps


def test_compiled_step_matches_eager(compose_cfg, tiny_dataset, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = run(compose_cfg("trainer.max_steps=8", "trainer.compile=false", "trainer.precision=fp32"), tmp_path / "e")
    compiled = run(compose_cfg("trainer.max_steps=8", "trainer.compile=true", "trainer.precision=fp32"), tmp_path / "c")
    assert compiled["auc"] == pytest.approx(eager["auc"], abs=2e-3)
    assert compiled["logloss"] == pytest.approx(eager["logloss"], rel=1e-3)
    assert not [r for r in caplog.records if "trainer.compile" in r.getMessage()]  # no fallback
    assert any((tmp_path / "inductor").iterdir())  # artifacts went to the cache dir
    assert any((tmp_path / "inductor" / compile_step.MARKER_DIR).iterdir())  # and the marker

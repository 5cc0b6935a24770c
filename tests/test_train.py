"""The Hydra app end to end: results.json, TensorBoard tags, learning, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlrm.config import ConfigError
from dlrm.train import run

from conftest import CONF_DIR, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = {
    "backend", "auc", "logloss", "ne", "steps", "samples", "step_time_ms", "samples_per_s",
    "embedding_bytes", "full_embedding_bytes", "compression_ratio", "peak_rss_bytes", "wall_s",
}  # fmt: skip
TAGS = {
    "train/loss", "train/step_time_ms", "train/samples_per_s", "memory/rss_bytes",
    "memory/embedding_bytes", "eval/auc", "eval/logloss",
}  # fmt: skip


def test_short_run_writes_results_and_tensorboard(compose_cfg, tiny_dataset, tmp_path):
    cfg = compose_cfg("trainer.max_steps=12", "trainer.eval_every=6")
    results = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    assert RESULT_KEYS <= set(results)
    assert results["backend"] == "full" and results["steps"] == 12 and results["samples"] == 12 * 256
    assert results["compression_ratio"] == pytest.approx(
        results["full_embedding_bytes"] / results["embedding_bytes"]
    )
    assert 0 < results["teacher_auc"] < 1
    events = EventAccumulator(str(tmp_path)).Reload()
    assert TAGS <= set(events.Tags()["scalars"])
    assert len(events.Scalars("eval/auc")) == 2  # mid-training (step 6) and final
    assert "embeddings/text_summary" in events.Tags()["tensors"]


def test_results_record_whether_the_rows_sat_on_huge_pages(compose_cfg, tiny_dataset, tmp_path, monkeypatch, caplog):
    """DLRM_HUGE_PAGES is an environment setting, not in the config: results.json and the log say."""
    from dlrm.malloc import huge_pages_available

    monkeypatch.setenv("DLRM_HUGE_PAGES", "off")
    with caplog.at_level("INFO", logger="dlrm"):
        assert run(compose_cfg("trainer.max_steps=2"), tmp_path / "off")["huge_pages"] is False
    assert "rows on huge pages" not in caplog.text
    monkeypatch.delenv("DLRM_HUGE_PAGES")
    caplog.clear()
    with caplog.at_level("INFO", logger="dlrm"):
        on = run(compose_cfg("trainer.max_steps=2", "optim.sparse.kernel=torch"), tmp_path / "on")["huge_pages"]
    assert on is huge_pages_available()  # True where Linux offers them (this machine: madvise)
    assert ("optim.sparse.kernel=torch, rows on huge pages)" in caplog.text) is on
    caplog.clear()
    with caplog.at_level("INFO", logger="dlrm"):  # the C kernel prefetches its rows: no huge pages asked
        native = run(compose_cfg("trainer.max_steps=2", "trainer.precision=fp32"), tmp_path / "native")
    assert native["huge_pages"] is False
    # what auto resolved to (in fp32 the MLPs' ReLU backward runs in C too)
    assert native["table_kernel"] == native["interaction_kernel"] == native["mlp_kernel"] == "native"
    assert native["precision"] == "fp32"
    assert (
        "table kernel native (optim.sparse.kernel=auto), interaction kernel native, MLP ReLU kernel native "
        "(model.kernel=auto), data" in caplog.text
    )


def test_a_run_shorter_than_its_warm_up_still_reports_step_times(compose_cfg, tiny_dataset, tmp_path):
    run(compose_cfg("trainer.max_steps=4", "trainer.warmup_steps=10"), tmp_path)

    def no_nan(token):
        raise AssertionError(f"results.json holds {token}, which strict JSON readers reject")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_nan)
    assert results["step_time_ms"] > 0 and results["samples_per_s"] > 0


def test_training_learns_above_chance(compose_cfg, tiny_dataset, tmp_path):
    results = run(compose_cfg("trainer.max_steps=150", "seed=3"), tmp_path)
    assert results["auc"] > 0.62, results  # chance is 0.5; the teacher's ceiling ~0.84
    assert results["logloss"] < 0.6  # a 50/50 guess scores 0.693; the constant 25% predictor 0.562


def test_dict_valued_data_options_take_command_line_dicts(compose_cfg):
    # dict options default to null, so a command-line dict replaces them (a {} default would be
    # a struct that refuses new keys)
    cfg = compose_cfg("data.multi_hot={C1:3}", "data.table_rows={C3:200000000}")
    assert dict(cfg.data.multi_hot) == {"C1": 3}
    assert dict(cfg.data.table_rows) == {"C3": 200_000_000}


def test_bad_values_fail_before_any_work(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.batch_size=0 must be >= 1"):
        run(compose_cfg("trainer.batch_size=0"), tmp_path)
    with pytest.raises(ConfigError, match=r"rank='abc' must be an integer"):
        run(compose_cfg("rank=abc"), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.device='tpu'"):
        run(compose_cfg("trainer.device=tpu"), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_data_path_is_one_clear_line(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=parquet", "data.path=/no/such/dir"])
    with pytest.raises(FileNotFoundError, match=r"data.path=/no/such/dir: no such directory"):
        run(cfg, tmp_path)


def test_non_finite_loss_names_the_step(compose_cfg, tiny_dataset, tmp_path):
    cfg = compose_cfg("optim.dense.name=sgd", "optim.dense.lr=1e30", "trainer.max_steps=20")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step \d+"):
        run(cfg, tmp_path)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlrm.train", *args],
        cwd=cwd, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_cli_unknown_backend_lists_choices(tmp_path):
    proc = _cli("emb=nope", cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: emb=nope: no such choice in conf/emb/ (") and "full" in line


def test_cli_bad_value_exits_with_one_line(tmp_path):
    proc = _cli("trainer.batch_size=0", cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: trainer.batch_size=0 must be >= 1" in proc.stderr
    # once on the console (stderr); the run's log file keeps it too
    assert proc.stderr.count("must be >= 1") == 1 and "must be >= 1" not in proc.stdout
    (log_file,) = tmp_path.glob("outputs/*/*/train.log")
    assert "trainer.batch_size=0 must be >= 1" in log_file.read_text()


def test_cli_run_and_multirun(data_root, tiny_dataset, tmp_path):
    """`python -m dlrm.train` as users type it, and a 2-job multirun returning the sweep metric."""
    proc = _cli(*tiny_overrides(data_root), "trainer.max_steps=5", f"hydra.run.dir={tmp_path}/run", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval AUC" in proc.stdout and "teacher ceiling" in proc.stdout
    assert (tmp_path / "run" / "results.json").is_file()
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").is_file()
    proc = _cli(
        # the joblib launcher the docs recommend: two worker processes, which the sweep's own
        # process must stop before it exits (it once waited for them forever: exit_without_teardown)
        "-m", *tiny_overrides(data_root), "trainer.max_steps=3", "seed=1,2", "hydra/launcher=local",
        "trainer.threads=1", f"hydra.sweep.dir={tmp_path}/sweep", cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    aucs = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text())["auc"] for i in (0, 1)]
    assert aucs[0] != aucs[1]  # the seed reaches the run


def test_auto_threads_count_the_cpus_from_before_openmp_bound_the_main_thread(tmp_path):
    """With OMP_PROC_BIND set, loading torch binds the main thread to one CPU: the thread count
    comes from the affinity read before that (as `import dlrm` does), not 1."""
    import os

    script = (
        "import os, dlrm; cpus = len(os.sched_getaffinity(0)); import torch; from dlrm.train import set_threads; "
        "print(cpus, len(os.sched_getaffinity(0)), set_threads(0))"
    )
    env = {**os.environ, "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    env.pop("LOCAL_WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    cpus, bound, threads = map(int, out.split())
    assert threads == cpus
    if cpus > 1:
        assert bound == 1  # what the old count read (libgomp's binding; if this changes, so may the need)


def test_auto_threads_share_the_cores_between_torchrun_processes(monkeypatch):
    """trainer.threads=0: all cores in a plain run, cores / LOCAL_WORLD_SIZE under torchrun
    (never 0), and an explicit count as given."""
    import os

    import torch

    from dlrm.train import set_threads

    import dlrm

    before = torch.get_num_threads()
    monkeypatch.setattr(dlrm, "CPUS_AT_START", 4)
    try:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert set_threads(0) == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads(0) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert set_threads(0) == 1
        assert set_threads(3) == 3
    finally:
        torch.set_num_threads(before)


def test_exit_without_teardown_runs_exit_handlers_and_flushes_output(tmp_path):
    """`python -m dlrm.train` ends with os._exit to skip Python's slow module teardown: the
    atexit handlers (the cache's write-back, logging) must still run, and buffered output must
    not be lost."""
    marker, hook, worker = tmp_path / "handler-ran", tmp_path / "threading-hook-ran", tmp_path / "thread-done"
    script = (
        "import atexit, sys, threading, time\n"
        "from dlrm.train import exit_without_teardown\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ok'))\n"
        # executors (joblib's sweep workers) stop through threading's hooks, before atexit's
        f"threading._register_atexit(lambda: open({str(hook)!r}, 'w').write('ok'))\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(worker)!r}, 'w').write('ok'))).start()\n"
        "sys.stdout.write('buffered line')\n"
        "exit_without_teardown()\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "buffered line"
    assert marker.read_text() == "ok" and hook.read_text() == "ok" and worker.read_text() == "ok"


def test_startup_bench_reads_each_phase_of_a_run(data_root, tiny_dataset):
    """scripts/bench_startup.py: launch to training, training and eval, exit; they add up."""
    from dlrm.bench.startup import main as bench_startup

    overrides = [o for o in tiny_overrides(data_root) if not o.startswith("trainer.max_steps")]
    result = bench_startup(["--steps", "3", "--runs", "1", *overrides])["this"]
    phases = result["start_s"] + result["train_eval_s"] + result["exit_s"]
    assert all(result[k] > 0 for k in ("start_s", "train_eval_s", "exit_s"))
    assert abs(phases - result["wall_s"]) < 0.05 and len(result["runs"]) == 1


def test_busy_cores_warning_names_the_thread_count_to_use(monkeypatch, caplog):
    """trainer.threads=0 on a machine where another job holds a core: one warning naming the
    setting (a trial measured 730-1083 ms steps with 2 threads there, 67 ms with 1)."""
    import os

    import dlrm.threads as train

    busy = train.busy_cores(0.05)
    assert busy is None or 0 <= busy <= (os.cpu_count() or 1) + 0.01
    monkeypatch.setattr(train, "busy_cores", lambda: 1.2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with caplog.at_level("WARNING", logger="dlrm"):
        assert train.warn_if_cores_busy(2)
    assert "keep 1.2 of the 2 cores busy: trainer.threads=1" in caplog.text
    assert not train.warn_if_cores_busy(1)  # one thread waits for no other
    monkeypatch.setattr(train, "busy_cores", lambda: 0.2)
    assert not train.warn_if_cores_busy(2)


def test_summary_of_a_resumed_run_names_the_steps_it_trained(tmp_path):
    """A resumed run trains only the steps after its checkpoint: the summary says which."""
    from dlrm.train import summary

    results = {"auc": 0.7, "logloss": 0.5, "ne": 0.9, "embedding_bytes": 2**20, "compression_ratio": 1.0,
               "samples_per_s": 1000.0, "step_time_ms": 10.0, "steps": 60, "wall_s": 13.0}
    assert "60 steps, 13 s in all (start-up and evals included)" in summary(results, tmp_path)
    text = summary({**results, "resumed_from_step": 40}, tmp_path)
    assert "1,000 samples/s, median step 10.0 ms, steps 41-60 (resumed at 40), 13 s in all" in text


def test_a_misspelled_key_is_one_line_naming_the_closest_setting(tmp_path):
    """`trainer.max_stepz=50` (no +) is a typo, not a new key: one line before Hydra's 6, with the
    key it was probably meant to be; known keys, keys inside open options and + overrides pass."""
    from dlrm.overrides import check_override_keys, known_keys

    keys = known_keys()
    assert {"trainer.max_steps", "emb.rank", "optim.sparse.kernel", "data.eval_rows"} <= keys
    for fine in (["trainer.max_steps=5", "emb=tt", "rank=8"], ["emb.shapes.C3.rows=[1,2]"],
                 ["data.multi_hot.C1=3"], ["+trainer.foo=1"], ["hydra.run.dir=x"], ["emb=cached", "emb.tt.rank=4"],
                 ["-m", "optim.dense.lr=0.1,0.2"], ["-m", "emb=tt,hashed", "emb.kernel=torch"],
                 ["+experiment=compression_grid", "emb.kernel=torch"]):
        assert check_override_keys(fine, keys) is None, fine
    # a key of another backend than the one chosen (Hydra: several lines, suggesting +key)
    assert check_override_keys(["emb=hashed", "emb.kernel=torch"], keys) == (
        "error: emb.kernel is not a setting of emb=hashed (it is one of emb=tt)"
    )
    assert check_override_keys(["emb.tt.rank=4"], keys) == (
        "error: emb.tt.rank is not a setting of emb=full (it is one of emb=cached)"
    )
    assert check_override_keys(["emb=cached", "emb.kernel=torch"], keys).endswith("did you mean emb.tt.kernel?")
    # the same for the model group: the interaction kernel is DLRM's, the cross layers DCNv2's
    assert check_override_keys(["model=dcnv2", "model.kernel=native"], keys) == (
        "error: model.kernel is not a setting of model=dcnv2 (it is one of model=dlrm)"
    )
    assert check_override_keys(["model.cross_layers=3"], keys) == (
        "error: model.cross_layers is not a setting of model=dlrm (it is one of model=dcnv2)"
    )
    assert check_override_keys(["model=dcnv2", "model.cross_layers=3"], keys) is None
    assert check_override_keys(["optim.sparse.kernal=torch"], keys) == (
        "error: optim.sparse.kernal is not a setting (did you mean optim.sparse.kernel?)"
    )
    proc = _cli("trainer.max_stepz=50", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.max_stepz is not a setting (did you mean trainer.max_steps?)"
    ]
    # no close key: where to find the section's settings (a "+key" would be rejected too)
    assert check_override_keys(["trainer.zzzzzz=1"], keys) == (
        "error: trainer.zzzzzz is not a setting (python -m dlrm.train --cfg job lists the trainer settings)"
    )


def test_an_unknown_group_choice_is_one_line_naming_the_closest(tmp_path):
    """`emb=ttt` got Hydra's 15-line message; now one line with the closest choice and the list.
    Existing choices, sweeps of them, nested groups and sweep functions pass."""
    from dlrm.overrides import check_group_choices

    for fine in (["emb=tt", "rank=8"], ["-m", "emb=full,tt,hashed"], ["+experiment=compression_grid"],
                 ["+experiment/compression_grid=full"], ["emb=glob(h*)"], ["trainer.max_steps=5"],
                 ["model=dcnv2", "data=synthetic"]):
        assert check_group_choices(fine) is None, fine
    assert check_group_choices(["-m", "emb=full,qrr"]).startswith(
        "error: emb=qrr: no such choice in conf/emb/ (did you mean qr? choices: cached, "
    )
    assert "did you mean compression_grid?" in check_group_choices(["+experiment=compresion_grid"])
    proc = _cli("emb=ttt", cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: emb=ttt: no such choice in conf/emb/ (did you mean tt? choices: ")
    assert ", tt)" in line or ", tt," in line


def test_capped_periodic_evals_read_their_batches_once(compose_cfg, tiny_dataset, tmp_path, monkeypatch, caplog):
    """The mid-training evals read the same unshuffled first batches each time: read once and held;
    the final eval reads the whole split again. Their metrics are those of a fresh read."""
    import dlrm.trainer
    from dlrm.data.loader import ParquetLoader

    reads = []
    epoch = ParquetLoader.epoch

    def counting(self, *a, **k):
        if not self.shuffle:  # the eval loader
            reads.append(1)
        return epoch(self, *a, **k)

    monkeypatch.setattr(ParquetLoader, "epoch", counting)
    fresh = {}
    evaluate = dlrm.trainer.Trainer.evaluate

    def checking(self, periodic=False):
        got = evaluate(self, periodic)
        if periodic and self._periodic_batches is not None:  # the same numbers from a new read
            held, self._periodic_batches = self._periodic_batches, None
            fresh[self.state.step] = (got, evaluate(self, periodic))
            self._periodic_batches = held
        return got

    monkeypatch.setattr(dlrm.trainer.Trainer, "evaluate", checking)
    run(compose_cfg("trainer.max_steps=8", "trainer.eval_every=2", "trainer.periodic_eval_batches=2"), tmp_path)
    # periodic evals at steps 2, 4, 6 (one read, plus one fresh read each above), the final one
    assert len(reads) == 1 + 3 + 1
    assert sorted(fresh) == [2, 4, 6]
    for held, again in fresh.values():
        assert held == again

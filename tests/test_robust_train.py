"""Bad input and interrupted runs in training (issue 12, items 9-17): each kind fails with one
line naming the bad thing, before long work, and loses nothing."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

from dlrm import checkpoint
from dlrm.checkpoint import CHECKPOINT_DIR, checkpoint_files
from dlrm.data.schema import DatasetMeta
from dlrm.data.synthetic import SyntheticSpec, ensure_dataset
from dlrm.overrides import check_overrides
from dlrm.train import UndefinedMetric, run, sweep_metric
from dlrm.trainer import Interrupted, StopOnSignal, Trainer

from conftest import CONF_DIR, TINY, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
MODEL_ONLY = [o for o in tiny_overrides(Path("/unused")) if not o.startswith("data.")]


def parquet_cfg(path: Path, *extra: str):
    """The app's config for `data=parquet data.path=<path>` on a tiny synthetic copy."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=["data=parquet", f"data.path={path}", "data.eval_split=eval", *MODEL_ONLY, *extra],
        )


def rewrite_split(directory: Path, split: str, change, **write_args) -> None:
    """Apply change(table) -> table to every parquet file of a split, keeping its row groups."""
    meta = DatasetMeta.load(directory)
    for name in meta.splits[split]:
        f = directory / name
        rows = pq.ParquetFile(f).metadata.row_group(0).num_rows
        pq.write_table(change(pq.read_table(f)), f, row_group_size=rows, **write_args)


def cli(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlrm.train", *args], cwd=cwd, capture_output=True, text=True, timeout=240, **kw
    )


def _metrics(results: dict) -> tuple[float, float]:
    return results["auc"], results["logloss"]


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- 9: dataset identity


def test_resume_on_another_dataset_is_refused_and_a_moved_copy_resumes(tiny_dataset, tmp_path):
    first_data = tmp_path / "first_data"
    shutil.copytree(tiny_dataset, first_data)
    run(parquet_cfg(first_data, "trainer.max_steps=5", "trainer.checkpoint_every=5"), tmp_path / "first")
    ckpt = checkpoint.load(checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)[5])
    assert str(tmp_path) not in json.dumps(ckpt["dataset"])  # no absolute paths in the identity

    # A moved copy of the same data resumes.
    moved = tmp_path / "elsewhere" / "data"
    shutil.move(first_data, moved)
    resumed = run(parquet_cfg(moved, "trainer.max_steps=8", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "ok")
    assert resumed["steps"] == 8

    # Other tables (a smaller vocabulary), then equal tables but other rows: both refused.
    other_tables = ensure_dataset(SyntheticSpec(**{**TINY, "max_cardinality": 1500}), tmp_path / "o1")
    with pytest.raises(ValueError, match=r"another dataset .*table sizes \(C10 2000 vs 1500"):
        run(parquet_cfg(other_tables, "trainer.max_steps=8", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "x1")
    other_rows = ensure_dataset(SyntheticSpec(**{**TINY, "rows": 20_000}), tmp_path / "o2")
    with pytest.raises(ValueError, match=r"another dataset .*row counts \(train 30000 vs 20000\)"):
        run(parquet_cfg(other_rows, "trainer.max_steps=8", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "x2")
    assert not (tmp_path / "x2" / "results.json").exists() and not (tmp_path / "x2" / CHECKPOINT_DIR).exists()

    # From the command line: exit 2, one line, no traceback, nothing written.
    proc = cli("data=parquet", f"data.path={other_rows}", "data.eval_split=eval", *MODEL_ONLY,
               "trainer.max_steps=8", f"trainer.resume={tmp_path / 'first'}", f"hydra.run.dir={tmp_path}/x3")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    _no_traceback(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trained on another dataset" in errors[0] and "row counts" in errors[0]
    assert not (tmp_path / "x3" / "results.json").exists()


# ----------------------------------------------------------------------------- 17: weights-only


def planted_side_effect(path: str) -> None:
    Path(path).write_text("the pickle ran code")


class Planted:
    """Unpickling this runs `planted_side_effect`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return planted_side_effect, (self.marker,)


def test_checkpoint_holding_an_object_is_refused_without_running_it(compose_cfg, tiny_dataset, tmp_path):
    run(compose_cfg("trainer.max_steps=3", "trainer.checkpoint_every=3"), tmp_path / "first")
    good = checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)[3]
    payload = checkpoint.load(good)  # ours load weights-only (every backend: tests/test_checkpoint.py)
    assert isinstance(payload["rng"]["numpy"][1], torch.Tensor)

    marker = tmp_path / "pwned"
    payload["extra"] = Planted(marker)
    bad_dir = tmp_path / "planted" / CHECKPOINT_DIR
    bad_dir.mkdir(parents=True)
    torch.save(payload, bad_dir / "step-3.pt")
    with pytest.raises(ValueError, match=r"step-3.pt: refused: it holds .*planted_side_effect, not tensors"):
        run(compose_cfg("trainer.max_steps=6", f"trainer.resume={tmp_path / 'planted'}"), tmp_path / "r1")
    assert not marker.exists()
    assert not (tmp_path / "r1" / "results.json").exists()

    proc = cli(*tiny_overrides(tiny_dataset.parent), "trainer.max_steps=6",
               f"trainer.resume={tmp_path / 'planted'}", f"hydra.run.dir={tmp_path}/r2")  # fmt: skip
    assert proc.returncode == 2
    _no_traceback(proc)
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        line for line in proc.stderr.splitlines() if "refused: it holds" in line
    ]
    assert not marker.exists()

    # A checkpoint written before the RNG state became a tensor (numpy array inside) still loads.
    payload.pop("extra")
    payload["rng"]["numpy"] = np.random.get_state()
    torch.save(payload, bad_dir / "step-3.pt")
    assert checkpoint.load(bad_dir / "step-3.pt")["step"] == 3
    (bad_dir / "step-3.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(bad_dir / "step-3.pt")


# ----------------------------------------------------------------------------- 10: one class


def test_one_class_eval_split_has_undefined_auc(tiny_dataset, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    rewrite_split(data, "eval", lambda t: t.set_column(0, "label", pa.array(np.zeros(len(t), np.int8))))
    with caplog.at_level(logging.WARNING, logger="dlrm"):
        results = run(parquet_cfg(data, "trainer.max_steps=5"), tmp_path / "run")
    assert results["auc"] != results["auc"]  # NaN, not torchmetrics' 0.0
    assert "eval split 'eval' (data.eval_split) holds only label 0" in caplog.text
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text(), parse_constant=pytest.fail)
    assert on_disk["auc"] is None and on_disk["logloss"] == pytest.approx(results["logloss"])
    with pytest.raises(UndefinedMetric, match=r"trainer.metric \['auc'\] undefined"):
        sweep_metric(results, "auc")
    assert sweep_metric(results, "logloss") == results["logloss"]  # other metrics still count


# ----------------------------------------------------------------------------- 11: ids out of range


@pytest.mark.parametrize("statistics", [True, False], ids=["footer_stats", "data_pass"])
def test_eval_ids_out_of_range_fail_before_training(statistics, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    rows = DatasetMeta.load(data).cardinalities["C5"]

    def bad_last_row(t: pa.Table) -> pa.Table:
        ids = t.column("C5").to_numpy().copy()
        ids[-1] = rows  # one past the table's end, in the file's last row group
        return t.set_column(t.schema.get_field_index("C5"), "C5", pa.array(ids))

    rewrite_split(data, "eval", bad_last_row, write_statistics=statistics)
    f = data / DatasetMeta.load(data).splits["eval"][-1]
    last = pq.ParquetFile(f).metadata.num_row_groups - 1
    with pytest.raises(ValueError, match=rf"eval split: feature C5 has ids in \[0, {rows}\] in {f} \(row group {last}\), but its table has {rows} rows"):
        run(parquet_cfg(data, "trainer.max_steps=5"), tmp_path / "run")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())  # before any work
    if statistics:  # the command line: exit 2, that one line, before training starts
        proc = cli("data=parquet", f"data.path={data}", "data.eval_split=eval", *MODEL_ONLY,
                   f"hydra.run.dir={tmp_path}/cli")  # fmt: skip
        assert proc.returncode == 2
        _no_traceback(proc)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "eval split: feature C5 has ids in" in errors[0]
        assert "training steps" not in proc.stdout + proc.stderr
        assert not (tmp_path / "cli" / "results.json").exists()


# ----------------------------------------------------------------------------- 12: nothing compressed


def test_compressing_backend_that_compresses_nothing_says_so(compose_cfg, tiny_dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dlrm"):
        results = run(compose_cfg("emb=tt", "trainer.max_steps=3"), tmp_path / "none")
    assert results["compressed_tables"] == 0 and results["compression_ratio"] == pytest.approx(1.0)
    assert "emb=tt compresses no table: none has emb.min_rows=100000 rows" in caplog.text
    assert json.loads((tmp_path / "none" / "results.json").read_text())["compressed_tables"] == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dlrm"):
        results = run(compose_cfg("emb=tt", "emb.min_rows=1500", "rank=4", "trainer.max_steps=3"), tmp_path / "some")
    sizes = DatasetMeta.load(tiny_dataset).cardinalities.values()
    assert results["compressed_tables"] == sum(n >= 1500 for n in sizes) > 0
    assert "compresses no table" not in caplog.text
    # a cache counts the tables it caches (its store's backend, e.g. TT cores, sits inside it)
    for store in ("host", "tt"):
        results = run(compose_cfg("emb=cached", f"emb.store={store}", "emb.min_rows=1500", "rank=4",
                                  "trainer.max_steps=3"), tmp_path / store)  # fmt: skip
        assert results["compressed_tables"] == sum(n >= 1500 for n in sizes)
    assert "compresses no table" not in caplog.text


# ----------------------------------------------------------------------------- 13: override quoting


@pytest.mark.parametrize("value", ["/data/day=23", "/data/a#b", "/data/a[1]", "/data/it's", '/data/a"b=c'])
def test_override_with_grammar_characters_names_it_and_shows_the_quoting(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    error = check_overrides(["-m", "emb=tt", f"data.path={value}", "--cfg", "job"])
    assert error.startswith(f"error: cannot read the override {f'data.path={value}'!r}")
    quoted = error.rsplit("e.g. ", 1)[1]
    (as_typed,) = shlex.split(quoted)  # what the shell hands Hydra
    assert OverridesParser.create().parse_override(as_typed).value() == value
    assert check_overrides(["seed=1,2", "data.path=/plain/path", "+experiment=compression", "~foo"]) is None


def test_cli_override_with_equals_sign_is_one_line(tmp_path):
    proc = cli("data=parquet", "data.path=/data/day=23", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: cannot read the override 'data.path=/data/day=23' (mismatched input '=' expecting <EOF>): a value "
        "with = # ' [ ] { } , or spaces must be quoted for Hydra, e.g. 'data.path=\"/data/day=23\"'"
    ]
    assert not (tmp_path / "outputs").exists()


# ----------------------------------------------------------------------------- 14: signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(sig, compose_cfg, tiny_dataset, tmp_path, monkeypatch):
    extra = ["emb=cached", "emb.min_rows=500", "emb.cache_rows=400"]  # cache state must survive too
    straight = run(compose_cfg(*extra, "trainer.max_steps=16"), tmp_path / "straight")
    step = Trainer.train_step

    def signalled_at_7(self, batch):
        loss = step(self, batch)
        if self.state.step == 6:  # (the step being run is the 7th)
            os.kill(os.getpid(), sig)
        return loss

    monkeypatch.setattr(Trainer, "train_step", signalled_at_7)
    with pytest.raises(Interrupted) as stopped:
        run(compose_cfg(*extra, "trainer.max_steps=16"), tmp_path / "first")  # checkpoint_every=0
    monkeypatch.undo()
    assert stopped.value.exit_code == 128 + sig and stopped.value.step == 7
    assert sorted(checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)) == [7]
    assert not isinstance(getattr(signal.getsignal(sig), "__self__", None), StopOnSignal)  # restored
    resumed = run(compose_cfg(*extra, "trainer.max_steps=16", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "r")
    assert resumed["steps"] == 16
    assert _metrics(resumed) == pytest.approx(_metrics(straight), abs=1e-6)


def test_cli_sigterm_mid_run_resumes_to_the_uninterrupted_result(compose_cfg, data_root, tiny_dataset, tmp_path):
    """A real process signalled mid-run; also: library chatter stays in the log file."""
    steps = ["trainer.max_steps=400", "trainer.eval_every=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlrm.train", *tiny_overrides(data_root), *steps, f"hydra.run.dir={tmp_path}/first"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    for line in proc.stdout:  # wait until the loop runs, then signal it
        seen.append(line)
        if "training steps 1..400" in line:
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=120) == 143, out[-3000:]
    stopped = [int(f.stem.split("-")[1]) for f in (tmp_path / "first" / CHECKPOINT_DIR).glob("step-*.pt")]
    assert len(stopped) == 1 and 0 < stopped[0] < 400, out[-3000:]
    assert f"interrupted by SIGTERM after step {stopped[0]} of 400" in out
    resume_line = next(line for line in out.splitlines() if line.startswith("resume with: "))
    assert resume_line.endswith(f"trainer.resume={tmp_path / 'first'}") and "trainer.max_steps=400" in resume_line
    assert not (tmp_path / "first" / "results.json").exists()
    # torch's fx warning (and fbgemm's INFO lines, when its kernel runs): in the run's log file,
    # not on the console
    log_text = (tmp_path / "first" / "train.log").read_text()
    assert "is_fx_tracing" in log_text and "is_fx_tracing" not in out and "TBE=" not in out

    args = shlex.split(resume_line.removeprefix("resume with: python -m dlrm.train "))
    done = cli(*args, f"hydra.run.dir={tmp_path}/resumed")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    straight = run(compose_cfg(*steps), tmp_path / "straight")
    assert resumed["steps"] == 400
    assert _metrics(resumed) == pytest.approx(_metrics(straight), abs=1e-6)


def test_second_signal_exits_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from dlrm.trainer import StopOnSignal\n"
        "with StopOnSignal() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.signum == signal.SIGINT\n"
        "    print('first signal noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]  # killed by the signal itself
    assert "first signal noted" in proc.stdout and "not reached" not in proc.stdout


# ----------------------------------------------------------------------------- 16: periodic eval


def test_periodic_evals_are_capped_and_leave_training_and_final_eval_alone(compose_cfg, tiny_dataset, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        defaults = compose("config").trainer
    assert defaults.eval_every == 200 and defaults.periodic_eval_batches == 20 and defaults.eval_batches == 0
    once = run(compose_cfg("trainer.max_steps=12", "trainer.eval_every=0"), tmp_path / "once")
    with caplog.at_level(logging.INFO, logger="dlrm"):
        curve = run(compose_cfg("trainer.max_steps=12", "trainer.eval_every=4", "trainer.periodic_eval_batches=2"),
                    tmp_path / "curve")  # fmt: skip
    assert _metrics(curve) == _metrics(once)  # same training; the final eval reads the whole split
    assert "step 4 eval (2 batches, " in caplog.text and "step 8 eval (2 batches, " in caplog.text
    assert "step 12 eval (whole split, " in caplog.text
    points = EventAccumulator(str(tmp_path / "curve")).Reload().Scalars("eval/auc")
    assert [p.step for p in points] == [4, 8, 12]


@pytest.mark.slow  # a Hydra multirun through submitit's local executor: two job starts, ~30 s
def test_preempted_submitit_job_checkpoints_requeues_and_resumes(compose_cfg, data_root, tiny_dataset, tmp_path):
    """`hydra/launcher=submitit_local` runs jobs as SLURM would (submitit's job process, its
    preemption signal USR2, requeue by exit code): the job checkpoints, is requeued in the same
    output dir (a `${now:}` sweep dir included) and resumes there to the uninterrupted result."""
    import psutil

    steps = ["trainer.max_steps=400", "trainer.eval_every=0"]
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "dlrm.train", "-m", *tiny_overrides(data_root), *steps,
         "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/sweep_${{now:%H-%M-%S-%f}}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and sweeper.poll() is None:
        logs = list(tmp_path.glob("sweep_*/0/train.log"))
        if logs and "training steps 1..400" in logs[0].read_text():
            break
        time.sleep(0.2)
    jobs = [p for p in psutil.Process(sweeper.pid).children(recursive=True)
            if "submitit.core._submit" in " ".join(p.cmdline())]  # fmt: skip
    assert len(jobs) == 1, sweeper.stdout.read() if sweeper.poll() is not None else "no job process"
    jobs[0].send_signal(signal.SIGUSR2)
    out = sweeper.communicate(timeout=240)[0]
    assert sweeper.returncode == 0, out[-3000:]
    (job_dir,) = [p.parent for p in tmp_path.glob("sweep_*/0/train.log")]  # one dir: the requeue reused it
    log_text = (job_dir / "train.log").read_text()
    assert "stopped by SIGUSR2 after step" in log_text and "this job is preempted" in log_text
    assert "requeued job: resuming from the checkpoints in" in log_text
    resumed = json.loads((job_dir / "results.json").read_text())
    straight = run(compose_cfg(*steps), tmp_path / "straight")
    assert resumed["steps"] == 400
    assert _metrics(resumed) == pytest.approx(_metrics(straight), abs=1e-6)


def test_sweep_job_with_undefined_auc_fails_and_keeps_its_results(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    rewrite_split(data, "eval", lambda t: t.set_column(0, "label", pa.array(np.ones(len(t), np.int8))))
    proc = cli("-m", "data=parquet", f"data.path={data}", "data.eval_split=eval", *MODEL_ONLY,
               "trainer.max_steps=3", f"hydra.sweep.dir={tmp_path}/sweep")  # fmt: skip
    assert proc.returncode != 0  # the sweeper saw a failed job (Optuna: a FAIL trial, not a NaN score)
    assert "trainer.metric ['auc'] undefined" in proc.stderr
    results = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())  # nothing lost
    assert results["auc"] is None and results["steps"] == 3
    assert "holds only label 1" in (tmp_path / "sweep" / "0" / "train.log").read_text()

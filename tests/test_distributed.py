"""Several processes (torchrun, gloo on CPU): the same training as one process, rank-0-only
outputs, one-line refusals, and the loader's rank sharding.

The 2-process runs are subprocesses (`torchrun --nproc_per_node=2`), a few steps on the tiny
dataset. Starting a process (torch, torchrec, fbgemm imports) is most of what a launch costs on
2 cores, so launches are shared (5 in all): one runs tests/dist_worker.py (every model-level
comparison against one process, and the refusals); one two-"node" CLI run is the rendezvous
check, the rank-0-outputs check and the reference the killed-then-resumed run must equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dlrm import checkpoint
from dlrm.config import ConfigError
from dlrm.data.loader import ParquetLoader

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WORKER_BACKENDS = ["full", "hashed", "qr", "tt", "full_dp", "full_sgd"]


def _env() -> dict:
    # PYTHONPATH: this checkout, whichever dlrm the venv's editable install points at;
    # a short collective timeout so a hang fails the test instead of stalling it.
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DLRM_DIST_TIMEOUT_MIN="1")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def worker_results(tiny_dataset, tmp_path_factory):
    """tests/dist_worker.py's {"backends": {name: {"one", "two"}}, "refusals": {case: [msgs]}}:
    one torchrun launch for the model-level comparisons and refusals (process start-up is most
    of a launch's cost here)."""
    out = tmp_path_factory.mktemp("worker") / "results.json"
    proc = _run([*TORCHRUN, str(ROOT / "tests" / "dist_worker.py"), str(tiny_dataset), str(out), *WORKER_BACKENDS])
    # whether the results were written tells an abort at exit from one mid-run
    assert proc.returncode == 0, f"results written: {out.exists()}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", WORKER_BACKENDS)
def test_two_ranks_train_like_one_process_with_the_global_batch(worker_results, backend):
    one, two = (worker_results["backends"][backend][k] for k in ("one", "two"))
    # Same initial weights: the 2-rank eval (sharded rows, padded, gathered) is the 1-process AUC.
    assert two["auc_init"] == pytest.approx(one["auc_init"], abs=1e-6)
    # The loss of each global batch, fp32, 20 steps: only float summation order differs (the
    # batch dimension is reduced in halves, then across ranks); measured <= 1.2e-7.
    diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)]
    assert max(diffs) < 1e-5, diffs
    # Every table moved as far as in one process (a wrong gradient scale shows in full_sgd).
    assert two["table_update_sq"] == pytest.approx(one["table_update_sq"], rel=1e-4)
    assert two["replicas_equal"] and two["replicated"]  # MLPs, TT cores, data-parallel tables
    assert two["auc_final"] == pytest.approx(one["auc_final"], abs=1e-5)
    assert "sharding:" in two["describe"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("cached", "emb=cached is single-process"),
        ("row_wise", "emb.sharding=row_wise: not on CPU (gloo has no reduce_scatter)"),
        # rank 0 plans alone; its planning error is broadcast, so rank 1 raises it too (no hang)
        ("too_big", "sharding plan failed (PlannerError): Unable to find a plan"),
    ],
)
def test_what_cannot_run_distributed_is_refused_alike_on_every_rank(worker_results, case, message):
    messages = worker_results["refusals"][case]
    assert len(messages) == 2 and all(m.startswith(message) for m in messages), messages
    assert messages[0] == messages[1]


def test_a_plan_that_cannot_fit_fails_with_one_line_on_every_rank(tiny_dataset, data_root, tmp_path):
    """The CLI end to end: each rank prints the one line and exits, before any training."""
    args = [*tiny_overrides(data_root), "trainer.max_steps=2", "emb.rank_memory_gb=0.0005",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _run([*TORCHRUN, "-m", "dlrm.train", *args], timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    message = "error: sharding plan failed (PlannerError): Unable to find a plan"
    assert len(lines) == 2 and all(line.startswith(message) for line in lines), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()


# The CLI runs below share one config; the straight (two-node) run is also the reference for the
# killed-then-resumed (one-node) one.
CKPT_EVERY, STRAIGHT_STEPS = 4, 16


def _cli_args(data_root: Path, out: Path, max_steps: int) -> list[str]:
    # table_wise: the same plan for 2 nodes x 1 process and 1 node x 2 (auto may differ by topology)
    return [*tiny_overrides(data_root), "emb=hashed", "emb.sharding=table_wise", f"trainer.checkpoint_every={CKPT_EVERY}",
            "trainer.eval_batches=2", f"trainer.max_steps={max_steps}", f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def straight_run(tiny_dataset, data_root, tmp_path_factory):
    """(run dir, stdout of both) of two torchrun invocations ("nodes" of one process each) that
    meet at a c10d rendezvous on 127.0.0.1 and train together: 16 steps, checkpoints every 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    rdzv = [f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_backend=c10d", "--rdzv_id=two-nodes"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rdzv,
           "-m", "dlrm.train", *_cli_args(data_root, out, STRAIGHT_STEPS)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    return out, outputs[0][0] + outputs[1][0]


def test_two_nodes_train_together_and_rank_zero_alone_writes_results(straight_run):
    out, stdout = straight_run
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["global_batch_size"] == 2 * 256
    assert results["samples"] == STRAIGHT_STEPS * 2 * 256
    assert len(results["peak_rss_bytes_per_rank"]) == 2
    assert 0 < results["auc"] < 1
    assert len(list(out.glob("events.out.tfevents*"))) == 1  # one TensorBoard writer: rank 0
    assert stdout.count("eval AUC") == 1  # one summary
    steps = list(range(CKPT_EVERY, STRAIGHT_STEPS + 1, CKPT_EVERY))[-checkpoint.KEEP :]  # older ones pruned
    assert {p.name for p in (out / "checkpoints").iterdir()} == {f"step-{n}.{e}" for n in steps for e in ("pt", "dcp")}


def test_one_process_refuses_a_torchrun_checkpoint(straight_run, compose_cfg, tmp_path):
    """The check `python -m dlrm.train trainer.resume=...` runs first (in-process here: a CLI
    ConfigError is one line and exit code 2, tests/test_train.py)."""
    from dlrm.distributed.run import prepare

    out, _ = straight_run
    with pytest.raises(ConfigError, match=r"trainer.resume=.*written by a torchrun run .* under torchrun"):
        prepare(compose_cfg(f"trainer.resume={out}"), torch.device("cpu"), tmp_path)


def test_sharding_choices_on_cpu():
    from dlrm.distributed.model import CPU_SHARDING, sharding_types

    cpu = torch.device("cpu")
    assert sharding_types("auto", cpu) == CPU_SHARDING and "row_wise" not in CPU_SHARDING
    assert sharding_types("column_wise", cpu) == ["column_wise"]
    with pytest.raises(ConfigError, match="emb.sharding=row_wise: not on CPU"):
        sharding_types("row_wise", cpu)
    assert sharding_types("row_wise", torch.device("cuda")) == ["row_wise"]


def test_ranks_read_disjoint_row_groups_and_yield_equally_many_batches(tiny_dataset):
    def loaders(split, pad, batch_size=700, world=3):
        return [
            ParquetLoader(tiny_dataset, split, batch_size=batch_size, seed=3, rank=r, world_size=world, pad=pad)
            for r in range(world)
        ]

    whole = ParquetLoader(tiny_dataset, "train", batch_size=700, seed=3)
    shares = [set(l._rank_order(0)) for l in loaders("train", False)]
    assert set().union(*shares) == set(range(len(whole.row_groups)))
    assert sum(len(s) for s in shares) == len(whole.row_groups)  # disjoint
    counts = [sum(1 for _ in l.epoch(0)) for l in loaders("train", False)]
    assert len(set(counts)) == 1 and counts[0] == len(loaders("train", False)[0])

    # Eval (pad): equally many batches, empty ones at the end, every row exactly once.
    epochs = [list(l.epoch(0)) for l in loaders("eval", True, batch_size=500, world=2)]
    assert min(len(e[-1]) for e in epochs) == 0  # 3904 rows make 8 batches, 4096 make 9: padded
    assert len({len(e) for e in epochs}) == 1
    eval_rows = ParquetLoader(tiny_dataset, "eval", batch_size=500).num_rows
    assert sum(len(b) for e in epochs for b in e) == eval_rows
    labels = torch.cat([b.labels for e in epochs for b in e])
    single = torch.cat([b.labels for b in ParquetLoader(tiny_dataset, "eval", batch_size=500, shuffle=False).epoch(0)])
    assert labels.sum() == single.sum()


def test_more_processes_than_row_groups_is_one_clear_error(tiny_dataset):
    n = len(ParquetLoader(tiny_dataset, "eval", batch_size=100).row_groups)
    with pytest.raises(ValueError, match=f"has {n} row groups, fewer than the {n + 1} processes"):
        ParquetLoader(tiny_dataset, "eval", batch_size=100, rank=0, world_size=n + 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_stops_the_run_and_it_resumes_exactly_from_the_last_checkpoint(
    straight_run, data_root, tmp_path
):
    """Kill rank 1 after the first checkpoint: torchrun stops rank 0 at once and names the dead
    rank; resuming from the last whole checkpoint (step-N.pt is written last) trains to the same
    weights as the run that was never stopped (sharded tables, optimizer state, data position)."""
    import time

    import psutil

    out = tmp_path / "run"
    job = subprocess.Popen([*TORCHRUN, "-m", "dlrm.train", *_cli_args(data_root, out, 100_000)], cwd=ROOT,
                           env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / f"step-{CKPT_EVERY}.pt").exists():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(job.pid).children(recursive=True)
                   if p.environ().get("LOCAL_RANK") == "1"]
        assert workers
        workers[0].kill()
        t0 = time.monotonic()
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and time.monotonic() - t0 < 60  # rank 0 did not wait for the timeout
    assert "local_rank: 1" in err  # torchrun names the rank that died
    assert not (out / "results.json").exists()
    last = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    assert last < STRAIGHT_STEPS, "killed too late to compare"
    resumed = _run([*TORCHRUN, "-m", "dlrm.train", *_cli_args(data_root, tmp_path / "resumed", STRAIGHT_STEPS),
                    f"trainer.resume={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results, straight = (json.loads((d / "results.json").read_text())
                         for d in (tmp_path / "resumed", straight_run[0]))
    assert results["steps"] == STRAIGHT_STEPS and results["samples"] == straight["samples"]
    assert results["auc"] == straight["auc"] and results["logloss"] == straight["logloss"]

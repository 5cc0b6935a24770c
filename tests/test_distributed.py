"""Several processes (torchrun, gloo on CPU): the same training as one process, rank-0-only
outputs, one-line refusals, and the loader's rank sharding.

The 2-process runs are subprocesses (`torchrun --nproc_per_node=2`), a few steps on the tiny
dataset; tests/dist_worker.py holds the model-level comparison.
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
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def worker_results(tiny_dataset, tmp_path_factory):
    """{backend: (one-process result, two-process result)} from tests/dist_worker.py."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    worker = str(ROOT / "tests" / "dist_worker.py")
    for cmd, out in (([sys.executable, worker], one), ([*TORCHRUN, worker], two)):
        proc = _run([*cmd, str(tiny_dataset), str(out), *WORKER_BACKENDS])
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        b: (json.loads((one / f"{b}.json").read_text()), json.loads((two / f"{b}.json").read_text()))
        for b in WORKER_BACKENDS
    }


@pytest.mark.parametrize("backend", WORKER_BACKENDS)
def test_two_ranks_train_like_one_process_with_the_global_batch(worker_results, backend):
    one, two = worker_results[backend]
    # Same initial weights: the 2-rank eval (sharded rows, padded, gathered) is the 1-process AUC.
    assert two["auc_init"] == pytest.approx(one["auc_init"], abs=1e-6)
    # Losses of the global batch: equal at first (a wrong gradient scale shows from step 2 on at
    # ~1e-3); float summation order then drifts them apart slowly (Adam on the MLPs amplifies it).
    diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)]
    assert max(diffs[:5]) < 1e-5, diffs
    assert max(diffs) < 3e-4, diffs
    assert two["replicas_equal"]  # DDP kept the dense weights identical on both ranks
    assert two["auc_final"] == pytest.approx(one["auc_final"], abs=2e-3)
    assert "sharding:" in two["describe"]


def test_torchrun_cli_run_writes_results_on_rank_zero_only(tiny_dataset, data_root, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_overrides(data_root), "trainer.max_steps=6", "emb=hashed", f"hydra.run.dir={out}"]
    proc = _run([*TORCHRUN, "-m", "dlrm.train", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["global_batch_size"] == 2 * 256
    assert results["samples"] == 6 * 2 * 256
    assert len(results["peak_rss_bytes_per_rank"]) == 2
    assert 0 < results["auc"] < 1
    assert len(list(out.glob("events.out.tfevents*"))) == 1  # one TensorBoard writer: rank 0
    assert proc.stdout.count("eval AUC") == 1  # one summary


@pytest.mark.parametrize(
    "override, message",
    [
        ("emb=cached", "error: emb=cached is single-process"),
        ("emb.sharding=row_wise", "error: emb.sharding=row_wise: not on CPU (gloo has no reduce_scatter)"),
        # tables of ~2 MB against 0.5 MB per rank: rank 0's planning error reaches both ranks, no hang
        ("emb.rank_memory_gb=0.0005", "error: sharding plan failed (PlannerError): Unable to find a plan"),
    ],
)
def test_what_cannot_run_distributed_fails_with_one_line_on_every_rank(
    tiny_dataset, data_root, tmp_path, override, message
):
    args = [*tiny_overrides(data_root), "trainer.max_steps=2", override, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _run([*TORCHRUN, "-m", "dlrm.train", *args], timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all(line.startswith(message) for line in lines), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()


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


def test_sharded_checkpoint_resumes_exactly_and_only_at_its_world_size(tiny_dataset, data_root, tmp_path):
    base = [*tiny_overrides(data_root), "trainer.checkpoint_every=3"]

    def torchrun(*args):
        proc = _run([*TORCHRUN, "-m", "dlrm.train", *base, *args])
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun("trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'first'}")
    assert {p.name for p in (tmp_path / "first" / "checkpoints").iterdir()} == {
        "step-3.pt", "step-3.dcp", "step-6.pt", "step-6.dcp"
    }
    torchrun("trainer.max_steps=9", f"trainer.resume={tmp_path / 'first'}", f"hydra.run.dir={tmp_path / 'resumed'}")
    torchrun("trainer.max_steps=9", f"hydra.run.dir={tmp_path / 'straight'}")
    resumed, straight = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("resumed", "straight"))
    assert resumed["auc"] == straight["auc"] and resumed["logloss"] == straight["logloss"]
    assert resumed["samples"] == straight["samples"] == 9 * 2 * 256

    # One process cannot take a 2-process checkpoint: one line, before any training.
    proc = _run([sys.executable, "-m", "dlrm.train", *base, "trainer.max_steps=9",
                 f"trainer.resume={tmp_path / 'first'}", f"hydra.run.dir={tmp_path / 'single'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.resume=") and "torchrun" in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_together(tiny_dataset, data_root, tmp_path):
    """Two torchrun invocations ("nodes") meeting at a c10d rendezvous on localhost."""
    out = tmp_path / "run"
    rdzv = [f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_backend=c10d", "--rdzv_id=two-nodes"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rdzv,
           "-m", "dlrm.train", *tiny_overrides(data_root), "trainer.max_steps=4", f"hydra.run.dir={out}"]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["samples"] == 4 * 2 * 256


def test_a_killed_rank_stops_the_run_and_it_resumes_from_the_last_checkpoint(tiny_dataset, data_root, tmp_path):
    import time

    import psutil

    out = tmp_path / "run"
    args = [*tiny_overrides(data_root), "trainer.max_steps=100000", "trainer.checkpoint_every=4",
            "trainer.eval_batches=2", f"hydra.run.dir={out}"]
    job = subprocess.Popen([*TORCHRUN, "-m", "dlrm.train", *args], cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-8.pt").exists():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
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
    steps = sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    resumed = _run([*TORCHRUN, "-m", "dlrm.train", *tiny_overrides(data_root), f"trainer.max_steps={steps[-1] + 2}",
                    f"trainer.resume={out}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["steps"] == steps[-1] + 2

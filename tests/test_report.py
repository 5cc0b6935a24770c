"""Sweep report (dlrm.report) on hand-written run dirs, and the sweep/launcher configs composing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dlrm import report

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, job: int, *, backend="full", seed=1, auc=None, knobs=None, data_rows=1000,
             log: str | None = None, results: dict | str | None = None) -> Path:
    """A Hydra-shaped run dir: .hydra/{config,overrides}.yaml, optional results.json and job log."""
    knobs = knobs or {}
    run = root / str(job)
    (run / ".hydra").mkdir(parents=True)
    config = {
        "emb": {"name": backend, "dim": 16},
        "data": {"name": "synthetic", "seed": 0, "rows": data_rows},
        "model": {"bottom_mlp": [32, 16], "top_mlp": [32, 1]},
        "seed": seed, "rank": 32, "compression": 16,
        "trainer": {"max_steps": 10, "batch_size": 64, "eval_batches": 0, "threads": 1},
    }
    config.update(knobs)
    overrides = [f"emb={backend}", f"seed={seed}"] + [f"{k}={v}" for k, v in knobs.items()]
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if auc is not None:
        ratio = {"full": 1.0}.get(backend, float(knobs.get("compression", knobs.get("rank", 8))))
        results = {
            "backend": backend, "auc": auc, "logloss": 0.5 - auc / 10, "ne": 0.9, "steps": 10,
            "samples": 640, "step_time_ms": 2.0 + seed, "samples_per_s": 1000.0 * seed,
            "embedding_bytes": int(64 * 2**20 / ratio), "full_embedding_bytes": 64 * 2**20,
            "compression_ratio": ratio, "peak_rss_bytes": seed * 2**30, "wall_s": 1.0,
        }
    if results is not None:
        (run / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    if log is not None:
        (run / "train.log").write_text(log)
    return run


TRACEBACK_LOG = """[2026-01-01 00:00:00,000][dlrm][INFO] - device cpu, 1 threads
Traceback (most recent call last):
  File "dlrm/train.py", line 1, in run
    raise RuntimeError("tt cores diverged: loss is nan")
RuntimeError: tt cores diverged: loss is nan
"""


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """full x3 seeds, hashed at 4x and 64x x3 seeds, tt rank 8 x1 seed, one crashed run."""
    root = tmp_path / "multirun"
    job = 0
    for backend, knobs, aucs in [
        ("full", {}, [0.70, 0.72, 0.74]),
        ("hashed", {"compression": 4}, [0.69, 0.71, 0.70]),
        ("hashed", {"compression": 64}, [0.60, 0.61, 0.62]),
        ("tt", {"rank": 8}, [0.71]),
    ]:
        for seed, auc in enumerate(aucs, start=1):
            make_run(root, job, backend=backend, seed=seed, auc=auc, knobs=knobs)
            job += 1
    make_run(root, job, backend="tt", seed=2, knobs={"rank": 8}, log=TRACEBACK_LOG)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _row(groups: pd.DataFrame, backend: str, knobs: str = "") -> pd.Series:
    sel = groups[(groups["backend"] == backend) & (groups["knobs"] == knobs)]
    assert len(sel) == 1, groups[["backend", "knobs"]]
    return sel.iloc[0]


def test_groups_by_seed_with_mean_std_and_noise_rule(sweep: Path):
    runs = [report.load_run(p) for p in report.find_run_dirs(sweep)]
    assert len(runs) == 11
    groups = report.group_runs(runs)
    assert list(groups["backend"]) == ["full", "hashed", "hashed", "tt"]  # backend order, then compression

    full = _row(groups, "full")
    assert full["n_seeds"] == 3 and full["seeds"] == "1 2 3"
    assert full["auc_mean"] == pytest.approx(0.72)
    assert full["auc_std"] == pytest.approx(0.02)  # sample std (ddof=1)
    assert full["peak_rss_bytes"] == 3 * 2**30  # max over seeds
    assert full["step_time_ms"] == pytest.approx(4.0)  # mean over seeds

    # hashed x4: d = 0.70 - 0.72 = -0.02; SE = sqrt(0.01^2/3 + 0.02^2/3) = 0.0129; 2 SE = 0.026
    x4 = _row(groups, "hashed", "compression=4")
    assert x4["auc_diff_vs_full"] == pytest.approx(-0.02)
    assert x4["auc_diff_se"] == pytest.approx(math.sqrt((0.01**2 + 0.02**2) / 3))
    assert x4["within_noise"] is True
    x64 = _row(groups, "hashed", "compression=64")
    assert x64["auc_diff_vs_full"] == pytest.approx(-0.11) and x64["within_noise"] is False
    assert x64["compression_ratio"] == 64

    tt = _row(groups, "tt", "rank=8")  # the override names the only tt group; one finished seed: a difference but no noise verdict
    assert tt["n_seeds"] == 1 and math.isnan(tt["auc_std"])
    assert tt["auc_diff_vs_full"] == pytest.approx(-0.01) and tt["within_noise"] is None


def test_no_baseline_when_data_differs(tmp_path: Path):
    for seed in (1, 2):
        make_run(tmp_path, seed, backend="full", seed=seed, auc=0.7)
        make_run(tmp_path, 10 + seed, backend="hashed", seed=seed, auc=0.6, knobs={"compression": 4},
                 data_rows=5000)  # another dataset: comparing AUCs would be meaningless
    groups = report.group_runs([report.load_run(p) for p in report.find_run_dirs(tmp_path)])
    hashed = _row(groups, "hashed", "compression=4")
    assert math.isnan(hashed["auc_diff_vs_full"]) and hashed["n_seeds"] == 2


def test_a_config_key_added_later_as_null_keeps_runs_comparable(tmp_path: Path):
    # Runs from before a key existed (no data.table_rows, multi_hot {}) against runs after it
    # (null defaults): the same data, so the baseline still applies.
    new_data = {"name": "synthetic", "seed": 0, "rows": 1000, "table_rows": None, "multi_hot": None,
                "workers": 0}  # how the data is read is not what it is
    for seed in (1, 2):
        make_run(tmp_path, seed, backend="full", seed=seed, auc=0.7,
                 knobs={"data": {"name": "synthetic", "seed": 0, "rows": 1000, "multi_hot": {}}})
        make_run(tmp_path, 10 + seed, backend="cached", seed=seed, auc=0.69, knobs={"data": new_data})
    groups = report.group_runs([report.load_run(p) for p in report.find_run_dirs(tmp_path)])
    cached = groups[groups["backend"] == "cached"].iloc[0]
    assert cached["auc_diff_vs_full"] == pytest.approx(-0.01)


def test_runs_with_and_without_huge_pages_are_separate_groups_against_one_baseline(tmp_path: Path):
    """DLRM_HUGE_PAGES is an environment variable, not config: results.json's `huge_pages` keeps
    such runs apart (their step times differ), and both compare to the full baseline (their
    AUCs do not depend on it), the one measured the same way."""
    for seed in (1, 2):
        for job, (backend, huge, auc) in enumerate([("full", True, 0.70), ("full", False, 0.70),
                                                    ("hashed", True, 0.69), ("hashed", False, 0.68)]):
            results = {"backend": backend, "auc": auc + seed / 1000, "steps": 10, "huge_pages": huge,
                       "step_time_ms": 2.0 if huge else 3.0}
            make_run(tmp_path, 10 * seed + job, backend=backend, seed=seed, results=results,
                     knobs={"compression": 4} if backend == "hashed" else {})
    groups = report.group_runs([report.load_run(p) for p in report.find_run_dirs(tmp_path)])
    assert len(groups) == 4 and set(groups["n_seeds"]) == {2}
    for huge in (True, False):
        hashed = _row(groups, "hashed", f"compression=4 env.huge_pages={huge}")
        assert hashed["auc_diff_vs_full"] == pytest.approx(-0.01 if huge else -0.02)
        full_run = hashed["baseline_run"]
        assert _row(groups, "full", f"env.huge_pages={huge}")["runs"].split()[0] == full_run


def test_cli_writes_table_csv_and_png_and_lists_failures(sweep: Path, tmp_path: Path, capsys):
    import matplotlib.image

    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert (out / "report.md").read_text() == stdout

    lines = stdout.splitlines()
    header = next(l for l in lines if l.startswith("| backend"))
    assert "AUC mean ± std (n)" in header and "ΔAUC vs full" in header
    x4 = next(l for l in lines if "compression=4 |" in l)
    assert "0.7000 ± 0.0100 (3)" in x4 and "-0.0200" in x4 and "within noise" in x4
    assert "within noise: |dAUC| <= 2 * SE" in stdout  # the rule is stated under the table

    # the crashed run is listed with its exception, not dropped
    assert "## Failed or unfinished runs (1)" in stdout
    failed = next(l for l in lines if l.startswith("- `"))
    assert str(sweep / "10") in failed and "RuntimeError: tt cores diverged: loss is nan" in failed

    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == 4 and {"auc_mean", "auc_std", "knobs", "within_noise", "runs"} <= set(csv.columns)
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 11 and (runs["status"] == "failed").sum() == 1

    png = matplotlib.image.imread(out / "pareto.png")
    assert png.shape[:2] == (500, 800)
    assert png[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_failed_runs_never_crash_the_report(tmp_path: Path, capsys):
    root = tmp_path / "sweep"
    make_run(root, 0, auc=0.7)
    make_run(root, 1, seed=2)  # unfinished: no results.json, no log
    make_run(root, 2, seed=3, results="{not json")
    make_run(root, 3, seed=4, results={"backend": "full", "logloss": 0.4})  # no auc
    make_run(root, 4, seed=5, log="[2026-01-01 00:00:00,000][dlrm][ERROR] - data.path=/x: no such directory\n")
    assert report.main([str(root)]) == 0
    text = capsys.readouterr().out
    assert "## Failed or unfinished runs (4)" in text
    assert "no results.json (failed or unfinished; no error in the job log)" in text
    assert "results.json unreadable" in text and "has no numeric 'auc'" in text
    assert "no results.json; data.path=/x: no such directory" in text


def test_all_runs_failed_still_reports_without_plot(tmp_path: Path, capsys):
    make_run(tmp_path, 0, log=TRACEBACK_LOG)
    (tmp_path / "pareto.png").write_bytes(b"stale")
    assert report.main([str(tmp_path)]) == 0
    assert "No finished runs." in capsys.readouterr().out
    assert not (tmp_path / "pareto.png").exists()  # a stale plot is removed, not left to mislead


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "missing: no such directory"),
    (lambda p: p, "no runs under"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, capsys, make, message):
    assert report.main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("report: error:") and "\n" not in err


def test_pareto_front_keeps_only_undominated_groups():
    pts = pd.DataFrame({"compression_ratio": [1, 4, 16, 16, 64], "auc_mean": [0.80, 0.79, 0.70, 0.78, 0.75]})
    front = report.pareto_front(pts)
    assert list(front["compression_ratio"]) == [1, 4, 16, 64]
    assert list(front["auc_mean"]) == [0.80, 0.79, 0.78, 0.75]  # (16, 0.70) is dominated by (16, 0.78)


def test_lists_optuna_pareto_set(tmp_path: Path, capsys):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(
        {"trainer": {"metric": ["auc", "embedding_bytes"]}, "hydra": {"sweeper": {"direction": ["maximize", "minimize"]}}}))
    (tmp_path / "optimization_results.yaml").write_text(yaml.safe_dump({"name": "optuna", "solutions": [
        {"params": {"emb": "tt", "rank": 8}, "values": [0.71, 1.5e6]},
        {"params": {"emb": "full", "rank": 32}, "values": [0.72, 6.4e7]},
    ]}))
    make_run(tmp_path, 0, auc=0.72)
    assert report.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "## Optuna Pareto set" in text
    assert "| auc (maximize) | embedding_bytes (minimize) | emb | rank |" in text
    assert "| 0.71 | 1.5e+06 | tt | 8 |" in text


def test_optuna_results_without_completed_trials_or_unreadable(tmp_path: Path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "optimization_results.yaml").write_text("name: optuna\nsolutions: []\n")
    (tmp_path / "b" / "optimization_results.yaml").write_text("name: optuna\nsolutions: {values: 3}\n")
    assert report.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "Empty: no trial completed." in text and "Could not read it:" in text


# ----------------------------------------------------------------------------- sweep configs

import shutil  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

POINTS_DIR = REPO / "conf" / "experiment" / "compression"
BACKENDS = ("full", "hashed", "qr", "tt", "cached")


def _compose_all(conf_dir: Path, override_sets: list[list[str]]) -> list:
    """config.yaml composed once per override set, under one Hydra initialization."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return [compose("config", overrides=o, return_hydra_config=True) for o in override_sets]


def _compose(conf_dir: Path, overrides: list[str]):
    return _compose_all(conf_dir, [overrides])[0]


@pytest.fixture
def conf_with_all_backends(tmp_path: Path) -> Path:
    """The project's conf/ plus a stub emb/<backend>.yaml for each backend main does not have yet,
    so the recipe's mechanics (point -> emb group + knob) can be composed today."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    for backend in BACKENDS:
        stub = conf / "emb" / f"{backend}.yaml"
        if not stub.exists():
            stub.write_text(f"name: {backend}\ndim: 16\n")
    return conf


def _sweep_jobs(cfg) -> list[list[str]]:
    """The jobs Hydra's basic sweeper would launch for cfg.hydra.sweeper.params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]


def test_compression_recipe_sweeps_each_point_once_per_seed(conf_with_all_backends: Path):
    cfg = _compose(conf_with_all_backends, ["+experiment=compression"])
    assert cfg.data.seed == 0 and cfg.trainer.eval_batches == 0 and cfg.trainer.eval_every == 0
    jobs = _sweep_jobs(cfg)
    points = sorted(p.stem for p in POINTS_DIR.glob("*.yaml"))
    assert len(points) == 13 and len(jobs) == 13 * 3  # no Cartesian repeats of full
    assert {tuple(sorted(j)) for j in jobs} == {
        (f"+experiment/compression={p}", f"seed={s}") for p in points for s in (1, 2, 3)}

    cfgs = _compose_all(conf_with_all_backends, [["+experiment=compression", f"+experiment/compression={p}"] for p in points])
    knobs = {p: (c.emb.name, c.compression, c.rank) for p, c in zip(points, cfgs)}
    assert all(c.trainer.max_steps == 1000 and c.data.seed == 0 for c in cfgs)  # the same for every point
    assert knobs["full"][0] == "full" and knobs["cached"][0] == "cached"
    assert {p: k[1] for p, k in knobs.items() if k[0] in ("hashed", "qr")} == {
        "hashed_x4": 4, "hashed_x16": 16, "hashed_x64": 64, "qr_x4": 4, "qr_x16": 16, "qr_x64": 64}
    assert {p: k[2] for p, k in knobs.items() if k[0] == "tt"} == {f"tt_r{r}": r for r in (4, 8, 16, 32, 64)}


def test_compression_recipe_composes_with_the_backends_on_this_branch():
    existing = [b for b in BACKENDS if (REPO / "conf" / "emb" / f"{b}.yaml").exists()]
    assert "full" in existing
    points = [p.stem for p in POINTS_DIR.glob("*.yaml") if p.stem.split("_")[0] in existing]
    cfgs = _compose_all(REPO / "conf", [["+experiment=compression", f"+experiment/compression={p}"] for p in points])
    assert [c.emb.name for c in cfgs] == [p.split("_")[0] for p in points]


def test_optuna_search_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose(REPO / "conf", ["+hparams_search=compression_pareto"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_.endswith("NSGAIISampler")
    assert list(sweeper.direction) == ["maximize", "minimize"]
    assert list(cfg.trainer.metric) == ["auc", "embedding_bytes"]  # one returned value per direction
    assert set(sweeper.params) == {"emb", "compression", "rank"}

    cfg = _compose(REPO / "conf", ["+hparams_search=lr_optuna"])
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.trainer.metric == "auc"
    assert cfg.hydra.sweeper.sampler._target_.endswith("TPESampler")


TOY_APP = """
import math, sys, hydra
@hydra.main(config_path=sys.argv.pop(1), config_name="config", version_base="1.3")
def main(cfg):
    # stands in for dlrm.train: fake results, returned as trainer.metric asks
    results = {"auc": 0.75 - 0.01 * math.log2(cfg.compression), "embedding_bytes": 1e8 / cfg.compression}
    metric = cfg.trainer.metric
    return results[metric] if isinstance(metric, str) else tuple(results[m] for m in metric)
main()
"""


@pytest.mark.slow  # a real Optuna sweep in a subprocess: ~5 s of CPU, mostly importing optuna
def test_report_lists_pareto_set_written_by_the_optuna_sweeper(tmp_path: Path, capsys):
    """The multi-objective config run through the real plugin (toy task), then read by the report."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import subprocess
    import sys

    app = tmp_path / "toy_app.py"
    app.write_text(TOY_APP)
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(app), str(REPO / "conf"), "-m", "+hparams_search=compression_pareto",
           "emb=full", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.population_size=2",
           f"hydra.sweep.dir={sweep_dir}", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report.main([str(sweep_dir)]) == 0
    text = capsys.readouterr().out
    assert "## Optuna Pareto set" in text
    assert "| auc (maximize) | embedding_bytes (minimize) | compression | rank |" in text


@pytest.mark.slow  # two real Optuna sweeps in subprocesses: ~10 s, mostly importing optuna
def test_optuna_study_in_sqlite_resumes(tmp_path: Path):
    """storage=sqlite keeps the study: a second sweep with the same storage adds its trials to
    the first's (needs SQLAlchemy < 2 beside optuna 2.10, pinned in pyproject.toml)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import subprocess
    import sys

    import optuna

    app = tmp_path / "toy_app.py"
    app.write_text(TOY_APP)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for n in (1, 2):
        cmd = [sys.executable, str(app), str(REPO / "conf"), "-m", "+hparams_search=lr_optuna",
               "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
               f"hydra.sweep.dir={tmp_path / f'sweep{n}'}", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    study = optuna.load_study(study_name="lr_optuna", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4


def test_local_parallel_launcher_config():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    launcher = _compose(REPO / "conf", ["hydra/launcher=local"]).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == 2 and launcher.backend == "loky"


def test_slurm_launcher_config_is_accepted_by_submitit(tmp_path: Path, monkeypatch):
    """No SLURM here: feed the config to submitit's slurm executor the way the Hydra plugin does
    (which rejects unknown keys) and check the sbatch script it would submit."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = _compose(REPO / "conf", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    assert params["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    # SlurmExecutor refuses to start without `srun`; the script text below needs no cluster.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m dlrm.train", "uid")
    for line in ("--cpus-per-task=8", "--gpus-per-node=1", "--mem=64GB", "--partition=gpu", "--time=240"):
        assert line in sbatch


# ----------------------------------------------------------------------------- end to end

TINY = [  # a few seconds of CPU: 2k rows, tables capped at 100 rows, 5 steps
    "data.rows=2000", "data.eval_rows=500", "data.max_cardinality=100", "data.row_group_rows=500",
    "trainer.max_steps=5", "trainer.warmup_steps=1", "trainer.batch_size=64", "trainer.threads=1",
    "trainer.progress=false", "trainer.precision=fp32", "model.bottom_mlp=[16]", "model.top_mlp=[8,1]",
]


@pytest.mark.slow  # 6 jobs of the real trainer in a subprocess: ~14 s of CPU, mostly imports
def test_report_on_a_real_multirun(tmp_path: Path, capsys):
    """2 learning rates x 2 seeds through `python -m dlrm.train -m`, plus lr=-1, which the trainer
    rejects: the sweep exits non-zero, and the report still has both groups and the 2 failures."""
    import os
    import subprocess
    import sys

    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dlrm.train", "-m", "seed=1,2", "optim.sparse.lr=0.01,0.1,-1", *TINY,
           f"data.root={tmp_path / 'data'}", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "optim.sparse.lr" in proc.stderr  # Hydra re-raises the failed job

    assert report.main([str(sweep_dir)]) == 0
    text = capsys.readouterr().out
    groups = pd.read_csv(sweep_dir / "report.csv")
    assert sorted(groups["knobs"]) == ["optim.sparse.lr=0.01", "optim.sparse.lr=0.1"]
    assert list(groups["n_seeds"]) == [2, 2] and list(groups["seeds"]) == ["1 2", "1 2"]
    runs = pd.read_csv(sweep_dir / "runs.csv")
    ok = runs[runs["status"] == "ok"]
    for lr in (0.01, 0.1):  # the group mean is the mean of that lr's results.json files
        aucs = [json.loads((Path(p) / "results.json").read_text())["auc"]
                for p in ok["path"] if f"optim.sparse.lr={lr}" in ok.set_index("path").at[p, "overrides"]]
        assert len(aucs) == 2
        assert groups.set_index("knobs").at[f"optim.sparse.lr={lr}", "auc_mean"] == pytest.approx(sum(aucs) / 2)
    assert "## Failed or unfinished runs (2)" in text
    # the reason, from the job's log
    assert text.count("no results.json; dlrm.config.ConfigError: optim.sparse.lr=-1 must be >= 0") == 2
    assert (sweep_dir / "pareto.png").is_file()


def test_same_seed_in_two_sweeps_is_flagged(tmp_path: Path, capsys):
    make_run(tmp_path / "a", 0, seed=1, auc=0.70)
    make_run(tmp_path / "b", 0, seed=1, auc=0.71)  # a rerun, not a second seed
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    assert "0.7050 ± 0.0071 (2, seeds repeat)" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").is_file()


def test_undefined_auc_and_uncompressed_runs_are_marked(tmp_path: Path, capsys):
    """auc: null (an eval split with one class) is shown as undefined, never as a score; a
    compressing backend that compressed no table (compressed_tables: 0) is marked."""
    make_run(tmp_path, 0, auc=0.7)
    one_class = make_run(tmp_path, 1, backend="hashed", knobs={"compression": 4}, auc=0.6)
    results = json.loads((one_class / "results.json").read_text())
    (one_class / "results.json").write_text(json.dumps({**results, "auc": None}))
    nothing = make_run(tmp_path, 2, backend="tt", knobs={"rank": 8}, auc=0.69)
    results = json.loads((nothing / "results.json").read_text())
    (nothing / "results.json").write_text(json.dumps({**results, "compressed_tables": 0}))
    assert report.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| hashed"))
    assert "undefined: one-class eval split (1)" in row and "0.6000" not in row
    assert "| tt (no table compressed: emb.min_rows) |" in text
    assert "Failed or unfinished" not in text  # both finished; neither is a failure
    groups = pd.read_csv(tmp_path / "report.csv")
    assert math.isnan(groups.set_index("backend").at["hashed", "auc_mean"])

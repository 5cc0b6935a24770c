"""`python -m dlrm.report DIR --grid`: methods x budgets on a tiny 2 x 2 sweep, unreachable cells named."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dlrm import report

from test_report import make_run


def _budget_run(root, job, backend, budget, seed, auc, step_ms):
    emb = {"name": backend, "dim": 16, "budget": budget}
    run = make_run(root, job, backend=backend, seed=seed, auc=auc, knobs={"emb": emb})
    res = json.loads((run / "results.json").read_text())
    res.update(step_time_ms=step_ms, budget=budget,
               embedding_bytes=int(64 * 2**20 / (budget or 1)), compression_ratio=float(budget or 1))
    (run / "results.json").write_text(json.dumps(res))
    return run


@pytest.fixture
def grid_sweep(tmp_path):
    """full (no budget) + hashed and hybrid at 10x and 100x, 2 seeds each; qr at 1000x unreachable."""
    job = 0
    cells = [("full", None, 0.770, 10.0), ("hashed", 10, 0.765, 11.0), ("hashed", 100, 0.750, 11.0),
             ("hybrid", 10, 0.7695, 12.0), ("hybrid", 100, 0.768, 12.0)]
    for backend, budget, auc, ms in cells:
        for seed, jitter in ((1, 0.0), (2, 0.0006)):
            _budget_run(tmp_path, job, backend, budget, seed, auc + jitter, ms)
            job += 1
    run = make_run(tmp_path, job, backend="qr", knobs={"emb": {"name": "qr", "dim": 16, "budget": 1000}})
    (run / "results.json").write_text(json.dumps({
        "backend": "qr", "budget": 1000, "unreachable": True,
        "reason": "emb.budget=1000: qr reaches at most 412x on these tables"}))
    return tmp_path


def test_grid_cells_and_markdown(grid_sweep, capsys):
    assert report.main([str(grid_sweep), "--grid"]) == 0
    cells = pd.read_csv(grid_sweep / "grid.csv").fillna("")
    cell = cells.set_index(["method", "budget"])
    assert set(cell.index) == {("hashed", 10.0), ("hashed", 100.0), ("hybrid", 10.0), ("hybrid", 100.0), ("qr", 1000.0)}
    assert cell.at[("hashed", 100.0), "auc_diff_vs_full"] == pytest.approx(-0.020)
    assert not cell.at[("hashed", 100.0), "within_noise"]
    assert cell.at[("hybrid", 10.0), "auc_diff_vs_full"] == pytest.approx(-0.0005)
    assert cell.at[("hybrid", 10.0), "step_ratio"] == pytest.approx(1.2)
    assert "412x" in cell.at[("qr", 1000.0), "unreachable"]
    text = (grid_sweep / "grid.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header == "| method | 10x | 100x | 1000x |"
    hashed = next(line for line in text.splitlines() if line.startswith("| hashed"))
    assert "-0.0200 ± 0.0004 ✗" in hashed and "1.10x step" in hashed and hashed.endswith("|  |")
    assert "unreachable: emb.budget=1000: qr reaches at most 412x" in text
    out = capsys.readouterr().out
    assert out.startswith("# Equal-memory grid")
    # an unreachable cell is not a failed run
    assert "Failed or unfinished" not in (grid_sweep / "report.md").read_text()
    runs = pd.read_csv(grid_sweep / "runs.csv")
    assert (runs["status"] == "unreachable").sum() == 1


def test_grid_without_budgets_says_so(tmp_path):
    make_run(tmp_path, 0, backend="full", auc=0.77)
    assert report.main([str(tmp_path), "--grid"]) == 0
    assert "No runs with emb.budget" in (tmp_path / "grid.md").read_text()


def test_runs_of_two_models_are_never_one_group_nor_each_others_baseline(tmp_path):
    dcn = {"name": "dcnv2", "bottom_mlp": [32, 16], "top_mlp": [32, 1], "cross_layers": 3, "low_rank": 64}
    dlrm = {"name": "dlrm", "bottom_mlp": [32, 16], "top_mlp": [32, 1]}
    job = 0
    for model, full_auc, hashed_auc in ((dlrm, 0.770, 0.760), (dcn, 0.780, 0.779)):
        for backend, auc in (("full", full_auc), ("hashed", hashed_auc)):
            for seed in (1, 2):
                make_run(tmp_path, job, backend=backend, seed=seed, auc=auc + seed * 1e-4, knobs={"model": model})
                job += 1
    assert report.main([str(tmp_path)]) == 0
    groups = pd.read_csv(tmp_path / "report.csv")
    assert len(groups) == 4  # (full, hashed) x (dlrm, dcnv2)
    hashed = groups[groups["backend"] == "hashed"]
    by_model = {("dcnv2" if "model.name=dcnv2" in k else "dlrm"): d for k, d in zip(hashed["knobs"], hashed["auc_diff_vs_full"])}
    assert by_model["dcnv2"] == pytest.approx(-0.001)  # against dcnv2's full, named in the knobs
    assert by_model["dlrm"] == pytest.approx(-0.010)   # against dlrm's full


def test_two_variants_of_a_method_at_one_budget_are_two_rows(tmp_path):
    """hybrid with emb.allocation=table and =global at 1000x: two grid rows, neither dropped."""
    job = 0
    for variant, auc in (("table", 0.75), ("global", 0.767)):
        for seed in (1, 2):
            emb = {"name": "hybrid", "dim": 16, "budget": 1000, "allocation": variant}
            run = make_run(tmp_path, job, backend="hybrid", seed=seed, auc=auc + 0.0002 * seed, knobs={"emb": emb})
            res = json.loads((run / "results.json").read_text()) | {"budget": 1000, "compression_ratio": 1000.0}
            (run / "results.json").write_text(json.dumps(res))
            job += 1
    for seed in (1, 2):
        _budget_run(tmp_path, job, "full", None, seed, 0.77, 10.0)
        job += 1
    assert report.main([str(tmp_path), "--grid"]) == 0
    cells = pd.read_csv(tmp_path / "grid.csv").set_index("method")
    assert set(cells.index) == {"hybrid (emb.allocation=global)", "hybrid (emb.allocation=table)"}
    assert cells.at["hybrid (emb.allocation=global)", "auc_diff_vs_full"] == pytest.approx(0.767 + 0.0003 - 0.77)
    assert "| hybrid (emb.allocation=table) |" in (tmp_path / "grid.md").read_text()


def test_eval_noise_scores_each_checkpoint_on_slices_of_the_eval_split(compose_cfg, tiny_dataset, tmp_path):
    """scripts/eval_noise.py: each run's last checkpoint re-scored on the whole eval split gives
    the run's own final AUC; slices and the seed spread follow from those scores."""
    import statistics

    from dlrm.report.eval_noise import main as eval_noise
    from dlrm.train import run

    results = {}
    for seed in (1, 2):
        results[seed] = run(
            compose_cfg(f"seed={seed}", "trainer.max_steps=4", "trainer.checkpoint_every=4", "trainer.eval_every=0"),
            tmp_path / "sweep" / str(seed),
        )
    summary = eval_noise([str(tmp_path / "sweep"), "--subsets", "2", "--out", str(tmp_path / "noise.json")])
    assert len(summary) == 1  # one group: the runs differ only by seed
    group = summary[0]
    assert group["seeds"] == [1, 2] and group["slice_rows"] * 2 <= group["rows"]
    for auc, seed in zip(group["auc_all"], (1, 2)):
        assert auc == pytest.approx(results[seed]["auc"], abs=1e-5)
    assert group["seed_sd_all"] == pytest.approx(statistics.stdev(group["auc_all"]))
    assert all(len(r["auc_slices"]) == 2 for r in group["runs"])
    assert json.loads((tmp_path / "noise.json").read_text())[0]["group"] == group["group"]

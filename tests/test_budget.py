"""emb.budget: every method fits its knobs to a compression ratio, or says it cannot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dlrm.data.schema import KAGGLE_CARDINALITIES, SPARSE
from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.budget import TOLERANCE, BudgetUnreachable, plan_budget
from dlrm.embeddings.registry import BACKENDS
from dlrm.train import run

CPU = torch.device("cpu")
ADAGRAD = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
SGD = OmegaConf.create({"name": "sgd", "lr": 0.1})
KAGGLE = [TableSpec(f"t_{f}", r, 16, (f,)) for f, r in zip(SPARSE, KAGGLE_CARDINALITIES)]
# Kaggle's shape, capped so the tables can be built in a test (26 tables, 0.3M rows)
CAPPED = [TableSpec(f"t_{f}", min(r, 40_000), 16, (f,)) for f, r in zip(SPARSE, KAGGLE_CARDINALITIES)]
METHODS = ("full", "fp16", "hashed", "qr", "hybrid", "tt", "mde")
BUDGETS = (2, 10, 100, 1000)
# What cannot reach its budget at dim 16 with row-wise Adagrad: full compresses nothing, fp16 stops
# at (16 * 4 + 4) / (16 * 2 + 4) = 1.89x, mde at (16 + 1) / (4 + 1) = 3.4x (widths of 4 floats).
UNREACHABLE = {("full", b) for b in BUDGETS} | {("fp16", b) for b in (10, 100, 1000)} | {
    ("mde", b) for b in (10, 100, 1000)
}


def plan(tables, name, budget, optim=ADAGRAD, **kw):
    cfg = OmegaConf.create({"name": name, "dim": 16, "budget": budget, **kw})
    return plan_budget(tables, cfg, optim, BACKENDS[name])


@pytest.mark.parametrize("name", METHODS)
def test_reached_ratio_within_tolerance_or_unreachable_on_kaggle_tables(name):
    for budget in BUDGETS:
        if (name, budget) in UNREACHABLE:
            with pytest.raises(BudgetUnreachable, match=rf"^emb.budget={budget}: emb={name} reaches at most [\d.]+x"):
                plan(KAGGLE, name, budget)
            continue
        p = plan(KAGGLE, name, budget)
        assert budget * (1 - TOLERANCE) <= p.ratio <= budget * (1 + TOLERANCE), (name, budget, p.ratio)


def test_unreachable_names_the_best_ratio():
    with pytest.raises(BudgetUnreachable) as e:
        plan(KAGGLE, "fp16", 10)
    assert e.value.best == pytest.approx(68 / 36, rel=1e-9) and "1.89x" in str(e.value)
    with pytest.raises(BudgetUnreachable, match="emb=mde reaches at most 3.4"):
        plan(KAGGLE, "mde", 100)


def test_small_tables_join_when_the_budget_needs_them():
    assert len(plan(KAGGLE, "hashed", 10).tables) == 10  # emb.min_rows=10000: the policy's 10
    assert len(plan(KAGGLE, "qr", 1000).tables) > 10  # QR's floor (2 sqrt(rows)) needs more tables


@pytest.mark.parametrize("name", [m for m in METHODS if m != "full"])
@pytest.mark.parametrize("optim", [ADAGRAD, SGD], ids=["rowwise_adagrad", "sgd"])
def test_planned_bytes_are_what_the_built_backend_measures(name, optim, caplog):
    for budget in (1.5, 2, 10, 100):
        try:
            p = plan(CAPPED, name, budget, optim)
        except BudgetUnreachable:
            assert (name, budget) in UNREACHABLE or optim is SGD or budget > 2
            continue
        emb = build_embeddings(CAPPED, p.cfg, optim, CPU)
        full = sum(t.full_bytes() for t in CAPPED)
        assert emb.embedding_bytes() == p.planned_bytes, (name, budget)
        assert full / emb.embedding_bytes() >= budget * (1 - TOLERANCE)


def test_hybrid_budget_may_leave_a_table_without_hot_rows():
    p = plan(CAPPED, "hybrid", 1000, hot_share=0.1)
    assert 0 in p.cfg.hot_rows.values()
    emb = build_embeddings(CAPPED, p.cfg, ADAGRAD, CPU)
    assert emb.embedding_bytes() == p.planned_bytes


def test_knobs_the_budget_chooses_cannot_also_be_set():
    with pytest.raises(ValueError, match="emb.buckets and emb.budget are both set"):
        plan(KAGGLE, "hashed", 10, buckets={"C3": 10})
    with pytest.raises(ValueError, match="emb.budget=0.5 must be >= 1"):
        plan(KAGGLE, "hashed", 0.5)
    with pytest.raises(ValueError, match="emb=cached has no budget model"):
        plan(KAGGLE, "cached", 10)


def test_run_records_budget_and_reached_ratio(compose_cfg, tiny_dataset, tmp_path):
    results = run(compose_cfg("emb=hybrid", "emb.budget=10", "trainer.max_steps=20"), tmp_path / "ok")
    assert results["budget"] == 10
    assert 9 <= results["compression_ratio"] <= 11
    with pytest.raises(BudgetUnreachable, match="emb.budget=10: emb=fp16 reaches at most 1.89x"):
        run(compose_cfg("emb=fp16", "emb.budget=10"), tmp_path / "fail")
    recorded = run(compose_cfg("emb=fp16", "emb.budget=10", "emb.budget_unreachable=record"), tmp_path / "rec")
    on_disk = json.loads((tmp_path / "rec" / "results.json").read_text())
    assert on_disk == recorded and on_disk["unreachable"] is True and on_disk["budget"] == 10
    assert "emb=fp16 reaches at most 1.89x" in on_disk["reason"] and np.isclose(on_disk["best_ratio"], 68 / 36)


def test_grid_recipe_lists_every_cell_and_records_unreachable_ones(data_root, tiny_dataset, tmp_path):
    """+experiment=compression_grid: its point list composes (every file exists), an unreachable
    cell writes results.json {unreachable: true} and exits 0 without training."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import tiny_overrides

    root = Path(__file__).resolve().parents[1]
    recipe = OmegaConf.load(root / "conf/experiment/compression_grid.yaml")
    points = [p.strip() for p in recipe.hydra.sweeper.params["+experiment/compression_grid"].split(",")]
    files = sorted(p.stem for p in (root / "conf/experiment/compression_grid").glob("*.yaml"))
    assert sorted(points) == files and len(points) == 29  # full + 7 methods (hybrid twice) x 4 budgets
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm.train", "-m", "+experiment=compression_grid", *tiny_overrides(data_root),
         "+experiment/compression_grid=fp16_x10,hybrid_x10", "seed=1", "trainer.max_steps=3",
         f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert cells[0]["unreachable"] is True and "emb=fp16 reaches at most 1.89x" in cells[0]["reason"]
    assert "auc" not in cells[0]
    assert cells[1]["backend"] == "hybrid" and cells[1]["budget"] == 10 and 9 <= cells[1]["compression_ratio"] <= 11


def zipf_counts(tmp_path, tables):
    """Integer Zipf(1.05) counts per id (id 0 most frequent, as the synthetic data's), as .npy files."""
    for t in tables:
        np.save(tmp_path / f"{t.features[0]}.npy", (2e5 / (np.arange(t.rows) + 1.0) ** 1.05).astype(np.int64))
    return str(tmp_path)


def test_hybrid_global_allocation_fits_with_one_count_threshold(tmp_path, caplog):
    counts = zipf_counts(tmp_path, CAPPED)
    full = sum(t.full_bytes() for t in CAPPED)
    for budget in (10, 100, 1000):
        caplog.clear()
        with caplog.at_level("INFO", logger="dlrm.embeddings.budget"):
            p = plan(CAPPED, "hybrid", budget, allocation="global", hot_share=0.9, counts=counts, min_rows=10000)
        assert budget * (1 - TOLERANCE) <= p.ratio <= budget * (1 + TOLERANCE), (budget, p.ratio)
        # the log counts the tables really compressed (those with a knob), not those considered
        assert f"compresses {len(p.tables)} tables ({len(CAPPED) - len(p.tables)} stay full)" in caplog.text
        emb = build_embeddings(CAPPED, p.cfg, ADAGRAD, CPU)
        assert emb.embedding_bytes() == p.planned_bytes and full / emb.embedding_bytes() == pytest.approx(p.ratio)
        # One threshold over all tables: every compressed table's least counted hot id is counted
        # at least as often as any table's most counted cold id (less one: the tied ids split).
        hot = {t: p.cfg.hot_rows[t.features[0]] for t in CAPPED if t.features[0] in p.cfg.hot_rows}
        per = {t: (2e5 / (np.arange(t.rows) + 1.0) ** 1.05).astype(np.int64) for t in hot}
        least_hot = min(per[t][h - 1] for t, h in hot.items() if h)
        most_cold = max(per[t][h] for t, h in hot.items() if h < t.rows)
        assert least_hot >= most_cold
        # hot_share 0.9: about one hashed row per nine exact rows
        for f, h in p.cfg.hot_rows.items():
            assert p.cfg.buckets[f] == max(1, -(-h // 9)) or abs(p.cfg.buckets[f] - h / 9) <= 1
    # At 1000x the small tables are compressed too (allocation=table leaves those under min_rows full)
    assert len(plan(CAPPED, "hybrid", 1000, allocation="global", hot_share=0.9, counts=counts).tables) > len(
        plan(CAPPED, "hybrid", 1000).tables)


def test_hybrid_global_fits_mild_budgets_on_tables_of_mostly_unseen_ids(tmp_path, caplog):
    """When every id seen in training is hot and the budget is still not filled (big tables, few
    training rows: most ids never seen), the plan grows the hashed rows instead of overshooting."""
    tables = [TableSpec("t_C1", 400_000, 16, ("C1",)), TableSpec("t_C2", 300, 16, ("C2",))]
    for t in tables:  # ids past 3000 never seen
        np.save(tmp_path / f"{t.features[0]}.npy", (2e5 / (np.arange(t.rows) + 1.0) ** 1.05).astype(np.int64) * (np.arange(t.rows) < 3000))
    full = sum(t.full_bytes() for t in tables)
    for budget in (2, 10, 100):
        with caplog.at_level("WARNING", logger="dlrm.embeddings.budget"):
            p = plan(tables, "hybrid", budget, allocation="global", hot_share=0.9, counts=str(tmp_path))
        assert budget * (1 - TOLERANCE) <= p.ratio <= budget * (1 + TOLERANCE), (budget, p.ratio)
        hot, buckets = p.cfg.hot_rows["C1"], p.cfg.buckets["C1"]
        if budget < 100:  # every seen id exact, and more hashed rows than hot_share's 1 in 10
            assert hot == 3000 and buckets > hot
        emb = build_embeddings(tables, p.cfg, ADAGRAD, CPU)
        assert emb.embedding_bytes() == p.planned_bytes and full / emb.embedding_bytes() == pytest.approx(p.ratio)
    assert "overshoots" not in caplog.text


def test_hybrid_global_allocation_needs_counts_and_a_budget():
    with pytest.raises(ValueError, match="emb.allocation=global needs per-id counts"):
        plan(CAPPED, "hybrid", 100, allocation="global")
    with pytest.raises(ValueError, match="emb.allocation=global needs emb.budget"):
        build_embeddings(CAPPED, OmegaConf.create({"name": "hybrid", "dim": 16, "allocation": "global"}), ADAGRAD, CPU)


def test_large_grid_recipe_composes_and_runs_a_tiny_instance(compose_cfg, data_root, tmp_path):
    """+experiment=compression_grid_large: compression_grid's settings and points, with the three
    largest tables at 40M rows; a tiny instance (those tables at 3000 rows) trains and reports."""
    import subprocess
    import sys
    from pathlib import Path

    from dlrm.data.synthetic import SyntheticSpec
    from tests.conftest import TINY, tiny_overrides

    root = Path(__file__).resolve().parents[1]
    cfg = compose_cfg("+experiment=compression_grid_large")
    grid = compose_cfg("+experiment=compression_grid")
    assert dict(cfg.data.table_rows) == {"C3": 40_000_000, "C12": 40_000_000, "C21": 40_000_000}
    assert (cfg.trainer.eval_batches, cfg.data.seed) == (0, 0)
    assert OmegaConf.masked_copy(cfg, ["trainer", "emb"]) == OmegaConf.masked_copy(grid, ["trainer", "emb"])
    tiny = {"C3": 3000, "C12": 3000, "C21": 3000}
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm.train", "-m", "+experiment=compression_grid_large", *tiny_overrides(data_root),
         "data.table_rows={C3:3000,C12:3000,C21:3000}", "+experiment/compression_grid=full,hashed_x10",
         "seed=1", "trainer.max_steps=3", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    full, hashed = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in (0, 1)]
    rows = SyntheticSpec(**TINY, table_rows=tiny).cardinalities()
    assert full["full_embedding_bytes"] == sum(rows) * (16 * 4 + 4) == hashed["full_embedding_bytes"]
    assert full["auc"] is not None and full["compression_ratio"] == 1.0
    assert hashed["budget"] == 10 and 9 <= hashed["compression_ratio"] <= 11

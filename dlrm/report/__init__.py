"""`python -m dlrm.report DIR [DIR ...]`: sweep runs -> markdown table, CSV and Pareto plot.

    python -m dlrm.report multirun/compression/2026-01-01/12-00-00
    python -m dlrm.report multirun/a multirun/b --out reports/ab

A run is a directory holding `.hydra/` or `results.json` (any depth below each DIR). Runs whose
composed config (`.hydra/config.yaml`) differs only by `seed` form a group: AUC is reported as
mean +/- std over its seeds and compared with the `full` group trained on the same data, model,
steps and eval split. Writes report.md (the table, also printed), report.csv (one row per group),
runs.csv (one row per run, failed ones included) and pareto.png into --out (default: first DIR).
Failed or unfinished runs are listed with a reason; they never stop the report. Optuna's
optimization_results.yaml (best trial or multi-objective Pareto set) is listed when present.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlrm.report.grid import grid_cells, grid_markdown
from dlrm.report.groups import group_runs
from dlrm.report.optuna import read_optuna
from dlrm.report.render import markdown, pareto_front, plot_pareto, runs_table
from dlrm.report.runs import ReportError, Run, find_run_dirs, load_run

__all__ = ["report", "main", "group_runs", "find_run_dirs", "load_run", "pareto_front", "Run", "ReportError"]


# ----------------------------------------------------------------------------- entry point


def report(dirs: list[Path], out: Path, grid: bool = False) -> str:
    """Read runs under dirs, write report.md/.csv, runs.csv and pareto.png into out; the markdown.

    With `grid`, also grid.md / grid.csv (methods x budgets, see grid.py), printed first."""
    runs, optuna = [], []
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
        runs += [load_run(p) for p in find_run_dirs(d)]
        optuna += read_optuna(d)
    if not runs and not optuna:
        raise ReportError(f"no runs under {' '.join(map(str, dirs))} (a run dir holds .hydra/ or results.json)")
    groups = group_runs(runs)
    failed = [r for r in runs if r.results is None and r.unreachable is None]
    text = markdown(groups, failed, optuna, len(runs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    first = ["backend", "knobs", "n_seeds", "seeds", "auc_mean", "auc_std", "auc_diff_vs_full", "auc_diff_se",
             "within_noise", "embedding_bytes", "compression_ratio"]
    cols = [c for c in first if c in groups] + [c for c in groups if c not in first and not c.startswith("_")]
    groups[cols].to_csv(out / "report.csv", index=False)
    runs_table(runs).to_csv(out / "runs.csv", index=False)
    png = out / "pareto.png"
    if not plot_pareto(groups, png) and png.exists():
        png.unlink()  # a stale plot from an earlier report would mislead
    if grid:
        cells = grid_cells(groups, [r for r in runs if r.unreachable is not None])
        grid_text = grid_markdown(cells)
        (out / "grid.md").write_text(grid_text)
        cells.to_csv(out / "grid.csv", index=False)
        text = grid_text + "\n" + text
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlrm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep or run directories")
    parser.add_argument("--out", type=Path, help="where report.md/.csv and pareto.png go (default: first DIR)")
    parser.add_argument("--grid", action="store_true",
                        help="also the equal-memory grid: methods x emb.budget (grid.md, grid.csv)")
    args = parser.parse_args(argv)
    out = args.out or args.dirs[0]
    try:
        text = report(args.dirs, out, grid=args.grid)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    written = ["report.md", "report.csv", "runs.csv"] + (["pareto.png"] if (out / "pareto.png").exists() else [])
    written += ["grid.md", "grid.csv"] if args.grid else []
    print(f"report: wrote {', '.join(str(out / f) for f in written)}", file=sys.stderr)
    return 0


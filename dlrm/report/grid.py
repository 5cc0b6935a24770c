"""`python -m dlrm.report DIR --grid`: methods as rows, memory budgets as columns.

The equal-memory view of the VLDB 2024 embedding-compression study (Zhang et al., arXiv
2311.15578), with what that study lacks: each cell is the AUC difference to `full` (mean over
seeds, +/- its standard error, with the noise verdict of the main table), the step-time ratio to
`full` and the embedding MiB reached. A cell whose budget the method cannot reach (results.json
`unreachable`, written by `emb.budget_unreachable=record`) says so and gives the method's best
ratio; a cell nobody ran is blank.

Budgets are `emb.budget` of each group's config (the ratio asked); the ratio reached is in the
main table (`compression x`). Groups without a budget (the `full` baseline, or runs of other
sweeps) are left out of the grid.
"""

from __future__ import annotations

import math

import pandas as pd

from dlrm.report.groups import BACKEND_ORDER
from dlrm.report.runs import Run


def grid_cells(groups: pd.DataFrame, unreachable: list[Run]) -> pd.DataFrame:
    """One row per (method, budget) cell: the grouped columns the grid shows, plus unreachable cells.

    Columns: method, budget, n_seeds, auc_diff_vs_full, auc_diff_se, within_noise, step_ratio,
    embedding_mib, compression_ratio, unreachable (reason or "")."""
    rows = []
    by_run = {run: i for i, runs in groups["runs"].items() for run in str(runs).split()} if len(groups) else {}
    for _, g in groups.iterrows():
        budget = g["_config"].get("emb.budget")
        if budget is None:  # the full baseline, or a run of another sweep
            continue
        base = by_run.get(g.get("baseline_run") or "")
        step_ratio = g.get("step_time_ms", math.nan) / groups.at[base, "step_time_ms"] if base is not None else math.nan
        rows.append({
            "method": _method(g), "budget": float(budget), "n_seeds": g["n_seeds"],
            "auc_diff_vs_full": g.get("auc_diff_vs_full", math.nan), "auc_diff_se": g.get("auc_diff_se", math.nan),
            "within_noise": g.get("within_noise"), "step_ratio": step_ratio,
            "embedding_mib": g.get("embedding_bytes", math.nan) / 2**20,
            "compression_ratio": g.get("compression_ratio", math.nan), "unreachable": "",
        })
    seen = {(r["method"], r["budget"]) for r in rows}
    for run in unreachable:
        res = run.unreachable or {}
        key = (str(res.get("backend", run.backend)), float(res.get("budget", math.nan)))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"method": key[0], "budget": key[1], "n_seeds": 0, "unreachable": str(res.get("reason", "unreachable"))})
    return pd.DataFrame(rows)


def _method(g: pd.Series) -> str:
    """The row label: the backend, plus its knobs other than the budget when groups of the backend
    differ in more (e.g. `hybrid (emb.allocation=global emb.hot_share=0.9)`), so that two
    variants at one budget are two rows, never one cell overwriting the other."""
    extra = [k for k in str(g.get("knobs") or "").split() if not k.startswith("emb.budget=")]
    return f"{g['backend']} ({' '.join(extra)})" if extra else str(g["backend"])


def _order(methods) -> list[str]:
    known = {m: i for i, m in enumerate(BACKEND_ORDER)}
    return sorted(set(methods), key=lambda m: (known.get(m.split(" ")[0], len(known)), m))


def _cell(c: pd.Series | None) -> str:
    if c is None:
        return ""
    if c["unreachable"]:
        return f"unreachable: {c['unreachable']}"
    d, se = c["auc_diff_vs_full"], c["auc_diff_se"]
    if d != d:  # NaN: no comparable full group, or an undefined AUC
        auc = "ΔAUC n/a"
    else:
        verdict = {True: " ≈", False: " ✗"}.get(c["within_noise"], "")
        auc = f"{d:+.4f} ± {se:.4f}{verdict}" if se == se else f"{d:+.4f}{verdict}"
    ratio = f"{c['step_ratio']:.2f}x step" if c["step_ratio"] == c["step_ratio"] else "step n/a"
    return f"{auc}<br>{ratio}, {c['embedding_mib']:,.1f} MiB ({c['compression_ratio']:,.0f}x, n={c['n_seeds']})"


def grid_markdown(cells: pd.DataFrame) -> str:
    """The grid as a markdown table (methods x budgets) with its legend."""
    if cells.empty:
        return "No runs with emb.budget: nothing to put in a grid (run +experiment=compression_grid).\n"
    budgets = sorted(cells["budget"].unique())
    header = ["method"] + [f"{b:g}x" for b in budgets]
    lines = ["# Equal-memory grid", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    index = {(r["method"], r["budget"]): r for _, r in cells.iterrows()}
    for m in _order(cells["method"]):
        lines.append("| " + " | ".join([m] + [_cell(index.get((m, b))) for b in budgets]) + " |")
    lines += ["", "Each cell: AUC minus the `full` baseline's (mean over seeds ± standard error; ≈ within noise, "
              "✗ beyond it: |ΔAUC| > 2 SE), step time over full's, embedding MiB, the compression reached "
              "and the number of seeds. Columns are the budgets asked (`emb.budget`)."]
    return "\n".join(lines) + "\n"

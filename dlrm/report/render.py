"""The report's outputs: the markdown table, the Pareto plot, the per-run table."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from dlrm.report.groups import BASELINE, NOISE_RULE
from dlrm.report.runs import Run

FIGSIZE, DPI = (8.0, 5.0), 100  # pareto.png is 800 x 500 pixels


# ----------------------------------------------------------------------------- output


def _num(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]


def markdown(groups: pd.DataFrame, failed: list[Run], optuna: list[dict], n_runs: int) -> str:
    out = [f"# Sweep report: {_count(len(groups), 'group')} from {_count(n_runs, 'run')} "
           f"({len(failed)} failed or unfinished)", ""]
    if len(groups):
        header = ["backend", "knobs", "emb MiB", "compression x", "AUC mean ± std (n)", "logloss",
                  "ΔAUC vs full", "noise", "step ms", "samples/s", "peak RSS MiB"]
        rows = []
        for _, g in groups.iterrows():
            verdict = {True: "within noise", False: "beyond noise"}.get(g.get("within_noise"), "")
            if g["backend"] == BASELINE:
                verdict = "baseline"
            std = _num(g["auc_std"], ".4f") or "n/a"
            n = f"{g['n_seeds']}, seeds repeat" if g["_repeated_seeds"] else g["n_seeds"]
            auc = f"{_num(g['auc_mean'], '.4f')} ± {std} ({n})" if g["auc_mean"] == g["auc_mean"] else (
                f"undefined: one-class eval split ({n})")
            backend = g["backend"]
            if backend != BASELINE and g.get("compressed_tables") == 0:
                backend += " (no table compressed: emb.min_rows)"
            rows.append([
                backend, g["knobs"], _num(g.get("embedding_bytes", math.nan) / 2**20, ",.2f"),
                _num(g.get("compression_ratio"), ",.1f"),
                auc,
                _num(g.get("logloss"), ".4f"),
                _num(g.get("auc_diff_vs_full"), "+.4f"), verdict, _num(g.get("step_time_ms"), ".2f"),
                _num(g.get("samples_per_s"), ",.0f"), _num(g.get("peak_rss_bytes", math.nan) / 2**20, ",.0f"),
            ])
        out += _md_table(header, rows)
        out += ["", f"ΔAUC: group mean minus the mean of the `full` group with the same data, model, "
                f"steps, batch size and eval split (blank: no such group). {NOISE_RULE}. Means over seeds; "
                "std is the sample std over seeds; peak RSS is the max over seeds; knobs are the config "
                "keys that differ between groups of the same backend."]
    else:
        out.append("No finished runs.")
    if failed:
        out += ["", f"## Failed or unfinished runs ({len(failed)})", ""]
        for run in failed:
            ov = " ".join(run.overrides) or "no overrides"
            out.append(f"- `{run.path}` ({run.backend}; {ov}): {run.reason}")
    for opt in optuna:
        out += ["", f"## Optuna {opt['kind']}: {opt['path']}", ""]
        if opt["rows"]:
            header = list(dict.fromkeys(k for r in opt["rows"] for k in r))
            out += _md_table(header, [[_fmt_cell(r.get(k, "")) for k in header] for r in opt["rows"]])
        elif opt["kind"] == "unreadable":
            out.append(f"Could not read it: {opt['error']}")
        else:
            out.append("Empty: no trial completed.")
    return "\n".join(out) + "\n"


def _fmt_cell(v) -> str:
    return format(v, ".6g") if isinstance(v, float) else str(v)


def plot_pareto(groups: pd.DataFrame, path: Path) -> bool:
    """Compression ratio (log x) vs AUC (mean ± std), one series per backend, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if "compression_ratio" not in groups:
        return False
    pts = groups[groups["auc_mean"].notna() & groups["compression_ratio"].gt(0)]
    if pts.empty:
        return False
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for backend, sub in pts.groupby("backend", sort=False):
        ax.errorbar(sub["compression_ratio"], sub["auc_mean"], yerr=sub["auc_std"].fillna(0),
                    fmt="o", capsize=3, label=backend)
        for _, g in sub.iterrows():
            if g["knobs"]:
                ax.annotate(g["knobs"], (g["compression_ratio"], g["auc_mean"]), fontsize=6,
                            xytext=(4, 4), textcoords="offset points")
    front = pareto_front(pts)
    ax.plot(front["compression_ratio"], front["auc_mean"], "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("compression ratio (full_embedding_bytes / embedding_bytes)")
    ax.set_ylabel("eval AUC (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": keep the size fixed
    plt.close(fig)
    return True


def pareto_front(pts: pd.DataFrame) -> pd.DataFrame:
    """Groups no other group beats on both compression and AUC, by increasing compression."""
    best = -math.inf
    keep = []
    for i, g in pts.sort_values(["compression_ratio", "auc_mean"], ascending=False).iterrows():
        if g["auc_mean"] > best:
            keep.append(i)
            best = g["auc_mean"]
    return pts.loc[keep].sort_values("compression_ratio")


def runs_table(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        row = {"path": str(r.path), "status": "ok" if r.results else "unreachable" if r.unreachable else "failed", "reason": r.reason or "",
               "backend": r.backend, "seed": r.config.get("seed"), "overrides": " ".join(r.overrides)}
        rows.append({**row, **(r.results or {})})
    return pd.DataFrame(rows)


def _count(n: int, noun: str) -> str:
    """`1 group`, `2 groups`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"

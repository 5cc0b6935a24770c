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
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from dlrm.config import flatten

BACKEND_ORDER = ["full", "hashed", "qr", "tt", "cached"]
BASELINE = "full"
# Keys that must match for a group to be compared with a full group: same dataset, same towers,
# same number and size of steps, same eval split. Everything else (lr, threads, ...) may differ.
SAME_FOR_BASELINE = ("data.", "model.", "trainer.max_steps", "trainer.batch_size", "trainer.eval_batches")
# ... except how the data is read, which does not change what it is.
LOADING_ONLY = ("data.workers", "data.root")
# Keys that describe the backend, not the setting it is compared in.
BACKEND_KEYS = ("emb.", "rank", "compression")
NOISE_SIGMAS = 2.0
NOISE_RULE = (
    f"within noise: |dAUC| <= {NOISE_SIGMAS:g} * SE, SE = sqrt(s1^2/n1 + s2^2/n2) "
    "(sample std s over n seeds of the group and of its full baseline; needs n >= 2 on both sides)"
)
FIGSIZE, DPI = (8.0, 5.0), 100  # pareto.png is 800 x 500 pixels


class ReportError(Exception):
    """Bad input: reported as one line, exit status 2."""


@dataclass
class Run:
    path: Path
    config: dict = field(default_factory=dict)  # flattened .hydra/config.yaml (or overrides)
    overrides: list = field(default_factory=list)
    results: dict | None = None
    reason: str | None = None  # why there are no results

    @property
    def backend(self) -> str:
        if self.results and "backend" in self.results:
            return str(self.results["backend"])
        return str(self.config.get("emb.name", "?"))


# ----------------------------------------------------------------------------- reading runs


def find_run_dirs(root: Path) -> list[Path]:
    """Run dirs under root (root itself included), in job order; hidden dirs (.submitit) skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if (here / ".hydra").is_dir() or "results.json" in filenames:
            found.append(here)
            dirnames.clear()  # a run's subdirs (TensorBoard, checkpoints) are not runs
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    # multirun/.../10 after .../9
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _read_yaml(path: Path):
    # Hydra saves configs unresolved (`${rank}` stays a string): plain YAML reads them as written.
    with open(path) as f:
        return yaml.safe_load(f)


def _overrides_as_config(overrides: list) -> dict:
    """['+a.b=1', 'emb=tt', '~x'] -> {'a.b': 1, 'emb': 'tt'}: the keys a run set on the command line."""
    cfg = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep and not key.startswith("~"):
            try:
                cfg[key.lstrip("+")] = yaml.safe_load(value) if value else value
            except yaml.YAMLError:  # sweep syntax or odd quoting: keep the text
                cfg[key.lstrip("+")] = value
    return cfg


def load_run(path: Path) -> Run:
    run = Run(path)
    hydra_dir = path / ".hydra"
    try:
        if (hydra_dir / "overrides.yaml").is_file():
            run.overrides = [str(o) for o in (_read_yaml(hydra_dir / "overrides.yaml") or [])]
        if (hydra_dir / "config.yaml").is_file():
            run.config = flatten(_read_yaml(hydra_dir / "config.yaml") or {})
        else:
            run.config = _overrides_as_config(run.overrides)
    except (OSError, yaml.YAMLError) as e:
        run.reason = f"unreadable .hydra/: {_one_line(e)}"
        return run
    results_path = path / "results.json"
    if not results_path.is_file():
        run.reason = job_log_reason(path)
        return run
    try:
        results = json.loads(results_path.read_text())
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        run.reason = f"results.json unreadable: {_one_line(e)}"
        return run
    if results.get("auc", 0) is None:  # written as null: undefined (an eval split with one class)
        results["auc"] = math.nan
    if not isinstance(results.get("auc"), (int, float)):
        run.reason = "results.json has no numeric 'auc'"
        return run
    run.results = results
    return run


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[(\w+)\] - ")  # Hydra's `[time][logger][LEVEL] - `
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def job_log_reason(path: Path) -> str:
    """'no results.json' plus the last exception (traceback or ERROR line) in the run's *.log."""
    last = None
    for log in sorted(path.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            m = _LOG_PREFIX.match(line)
            if m and m.group(1) in ("ERROR", "CRITICAL"):
                last = line[m.end():].strip()
            elif line.startswith("Traceback (most recent call last)"):
                # the exception line is the first unindented line after the frames
                for after in lines[i + 1:]:
                    if after and not after[0].isspace() and _EXC_LINE.match(after):
                        last = after.strip()
                        break
    return f"no results.json; {last}" if last else "no results.json (failed or unfinished; no error in the job log)"


# ----------------------------------------------------------------------------- grouping


def group_runs(runs: list[Run]) -> pd.DataFrame:
    """One row per group of finished runs that differ only by `seed`; knobs and baseline added."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.results is None:
            continue
        if run.config:
            key = tuple(sorted((k, v) for k, v in run.config.items() if k != "seed"))
            key = (("__backend__", run.backend),) + key
        else:  # results.json without .hydra/: nothing to group by
            key = (("__dir__", str(run.path)),)
        groups.setdefault(key, []).append(run)

    rows = []
    for members in groups.values():
        res = pd.DataFrame([m.results for m in members])
        numeric = res.select_dtypes("number")
        row = {"backend": members[0].backend, "n_seeds": len(members)}
        seeds = [str(m.config.get("seed", "?")) for m in members]
        row["seeds"] = " ".join(seeds)
        row["_repeated_seeds"] = len(set(seeds)) < len(seeds)  # e.g. one seed in two DIRs
        row["auc_mean"] = res["auc"].mean(skipna=False)  # one undefined AUC: the mean is too
        row["auc_std"] = res["auc"].std(ddof=1) if len(members) > 1 else math.nan
        for col in numeric.columns:
            if col == "peak_rss_bytes":
                row[col] = numeric[col].max()  # worst case over seeds
            elif col != "auc":
                row[col] = numeric[col].mean()
        if "compression_ratio" not in row and {"full_embedding_bytes", "embedding_bytes"} <= row.keys():
            row["compression_ratio"] = row["full_embedding_bytes"] / row["embedding_bytes"]
        if "logloss" in numeric:
            row["logloss_std"] = numeric["logloss"].std(ddof=1) if len(members) > 1 else math.nan
        row["runs"] = " ".join(str(m.path) for m in members)
        row["_config"] = {k: v for k, v in members[0].config.items() if k != "seed"}
        row["_overridden"] = {k for m in members for k in _overrides_as_config(m.overrides)}
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["backend", "knobs", "n_seeds", "auc_mean", "auc_std"])
    df = pd.DataFrame(rows)
    df["knobs"] = _knobs(df, runs)
    _add_baseline(df)
    order = {b: i for i, b in enumerate(BACKEND_ORDER)}
    df["_order"] = df["backend"].map(lambda b: order.get(b, len(order)))
    sort = ["_order", "backend"] + (["compression_ratio"] if "compression_ratio" in df else []) + ["knobs"]
    return df.sort_values(sort, kind="stable").drop(columns="_order").reset_index(drop=True)


_MISSING = object()


def _knobs(df: pd.DataFrame, runs: list[Run]) -> list[str]:
    """Per group, the config keys that tell it apart: keys whose value differs between groups of
    the same backend, plus the group's own command-line overrides whose value differs across the
    runs (`rank=8` of the only tt group). Overrides every run shares (`trainer.threads=1`) and
    `seed` are left out."""
    per_run = [_overrides_as_config(r.overrides) for r in runs if r.results]
    override_keys = {k for o in per_run for k in o}
    varying_overrides = {k for k in override_keys if len({repr(o.get(k, _MISSING)) for o in per_run}) > 1}
    varying: dict[str, set[str]] = {}
    for backend, sub in df.groupby("backend"):
        keys = set().union(*(c.keys() for c in sub["_config"]))
        varying[backend] = {k for k in keys if len({repr(c.get(k, _MISSING)) for c in sub["_config"]}) > 1}
    return [
        " ".join(f"{k}={_fmt_value(c[k])}" for k in sorted(varying[b] | (varying_overrides & own)) if k in c)
        for b, c, own in zip(df["backend"], df["_config"], df["_overridden"])
    ]


def _fmt_value(v) -> str:
    return "[" + ",".join(_fmt_value(x) for x in v) + "]" if isinstance(v, tuple) else str(v)


def _value(cfg: dict, key: str):
    """A config value, with unset (missing, null, empty) as one value: a key added to the config
    later (null by default) must not make old runs incomparable with new ones."""
    v = cfg.get(key)
    return None if v is None or v == {} or v == [] else v


def _matches(a: dict, b: dict, prefixes) -> bool:
    keys = {k for k in a.keys() | b.keys() if k.startswith(prefixes) and k not in LOADING_ONLY}
    return all(_value(a, k) == _value(b, k) for k in keys)


def _add_baseline(df: pd.DataFrame) -> None:
    """auc_diff_vs_full: group mean minus the comparable full group's mean, with the noise verdict."""
    fulls = df.index[df["backend"] == BASELINE]
    cols = {"auc_diff_vs_full": [], "auc_diff_se": [], "within_noise": [], "baseline_run": []}
    for _, row in df.iterrows():
        cands = [j for j in fulls if _matches(row["_config"], df.at[j, "_config"], SAME_FOR_BASELINE)]
        if row["backend"] == BASELINE or not cands:
            for col, v in zip(cols, (math.nan, math.nan, None, "")):
                cols[col].append(v)
            continue
        j = min(cands, key=lambda j: _distance(row["_config"], df.at[j, "_config"]))
        d = row["auc_mean"] - df.at[j, "auc_mean"]
        n1, n2 = row["n_seeds"], df.at[j, "n_seeds"]
        se = math.sqrt(row["auc_std"] ** 2 / n1 + df.at[j, "auc_std"] ** 2 / n2) if min(n1, n2) >= 2 else math.nan
        within = None if math.isnan(se) or math.isnan(d) else bool(abs(d) <= NOISE_SIGMAS * se)
        for col, v in zip(cols, (d, se, within, df.at[j, "runs"].split()[0])):
            cols[col].append(v)
    for col, values in cols.items():
        df[col] = values


def _distance(a: dict, b: dict) -> int:
    """Differences outside the backend's own keys (lr, threads, ...): the fewest = fairest baseline."""
    keys = {k for k in a.keys() | b.keys() if not k.startswith(BACKEND_KEYS)}
    return sum(_value(a, k) != _value(b, k) for k in keys)


# ----------------------------------------------------------------------------- Optuna


def read_optuna(root: Path) -> list[dict]:
    """Every optimization_results.yaml under root -> {'path', 'kind', 'rows' (dicts), 'error'}."""
    found = []
    for path in sorted(root.rglob("optimization_results.yaml")):
        try:
            kind, rows = _optuna_rows(_read_yaml(path) or {}, _objective_names(path.parent))
            found.append({"path": path, "kind": kind, "rows": rows})
        except (OSError, yaml.YAMLError, TypeError, AttributeError, ValueError) as e:
            found.append({"path": path, "kind": "unreadable", "rows": [], "error": _one_line(e)})
    return found


def _optuna_rows(data: dict, objectives: list[str]) -> tuple[str, list[dict]]:
    """The sweeper's two layouts: {'solutions': [{params, values}]} or {best_params, best_value}."""
    if "solutions" in data:  # multi-objective: the Pareto set
        rows = []
        for sol in data["solutions"]:
            values = list(sol.get("values") or [])
            names = objectives if len(objectives) == len(values) else [f"objective {i + 1}" for i in range(len(values))]
            rows.append({**dict(zip(names, values)), **(sol.get("params") or {})})
        return "Pareto set", rows
    if "best_params" in data:
        name = objectives[0] if len(objectives) == 1 else "best value"
        return "best trial", [{name: data.get("best_value"), **(data["best_params"] or {})}]
    raise ValueError("neither 'solutions' nor 'best_params'")


def _objective_names(sweep_dir: Path) -> list[str]:
    """'auc (maximize)', ... : trainer.metric and hydra.sweeper.direction of the sweep, from its
    multirun.yaml (basic sweeper) or else a job's .hydra/ (the Optuna sweeper writes none)."""
    sources = [(sweep_dir / "multirun.yaml", sweep_dir / "multirun.yaml")]
    sources += [(h / "config.yaml", h / "hydra.yaml") for h in sorted(sweep_dir.glob("*/.hydra"))[:1]]
    for config_path, hydra_path in sources:
        try:
            metric = (_read_yaml(config_path) or {}).get("trainer", {}).get("metric")
            direction = (_read_yaml(hydra_path) or {}).get("hydra", {}).get("sweeper", {}).get("direction")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        metrics = metric if isinstance(metric, list) else [metric] if metric else []
        directions = direction if isinstance(direction, list) else [direction] if direction else []
        if metrics and len(metrics) == len(directions):
            return [f"{m} ({d})" for m, d in zip(metrics, directions)]
    return []


# ----------------------------------------------------------------------------- output


def _num(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]


def markdown(groups: pd.DataFrame, failed: list[Run], optuna: list[dict], n_runs: int) -> str:
    out = [f"# Sweep report: {len(groups)} groups from {n_runs} runs ({len(failed)} failed or unfinished)", ""]
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
        row = {"path": str(r.path), "status": "ok" if r.results else "failed", "reason": r.reason or "",
               "backend": r.backend, "seed": r.config.get("seed"), "overrides": " ".join(r.overrides)}
        rows.append({**row, **(r.results or {})})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- entry point


def report(dirs: list[Path], out: Path) -> str:
    """Read runs under dirs, write report.md/.csv, runs.csv and pareto.png into out; the markdown."""
    runs, optuna = [], []
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
        runs += [load_run(p) for p in find_run_dirs(d)]
        optuna += read_optuna(d)
    if not runs and not optuna:
        raise ReportError(f"no runs under {' '.join(map(str, dirs))} (a run dir holds .hydra/ or results.json)")
    groups = group_runs(runs)
    failed = [r for r in runs if r.results is None]
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
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlrm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep or run directories")
    parser.add_argument("--out", type=Path, help="where report.md/.csv and pareto.png go (default: first DIR)")
    args = parser.parse_args(argv)
    out = args.out or args.dirs[0]
    try:
        text = report(args.dirs, out)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    written = ["report.md", "report.csv", "runs.csv"] + (["pareto.png"] if (out / "pareto.png").exists() else [])
    print(f"report: wrote {', '.join(str(out / f) for f in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

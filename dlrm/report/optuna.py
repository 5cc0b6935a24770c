"""Optuna sweeps: the best trial or the multi-objective Pareto set from optimization_results.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from dlrm.report.runs import _one_line, _read_yaml

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



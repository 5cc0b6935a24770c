"""Reading a sweep: run directories, their composed configs, results.json, and why a run failed."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dlrm.config import flatten


class ReportError(Exception):
    """Bad input: reported as one line, exit status 2."""


@dataclass
class Run:
    path: Path
    config: dict = field(default_factory=dict)  # flattened .hydra/config.yaml (or overrides)
    overrides: list = field(default_factory=list)
    results: dict | None = None
    reason: str | None = None  # why there are no results
    unreachable: dict | None = None  # results.json of a budget the method cannot reach

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


# results.json keys that describe how a run was measured, not what it trained, and the name the
# report groups them under (knobs show it as e.g. `env.huge_pages=False`).
MEASURED_UNDER = {"huge_pages": "env.huge_pages"}


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
    if results.get("unreachable"):  # emb.budget_unreachable=record: a grid cell, not a failure
        run.unreachable = results
        run.reason = f"unreachable budget: {results.get('reason', '')}"
        return run
    if results.get("auc", 0) is None:  # written as null: undefined (an eval split with one class)
        results["auc"] = math.nan
    if not isinstance(results.get("auc"), (int, float)):
        run.reason = "results.json has no numeric 'auc'"
        return run
    run.results = results
    # How the run was measured, where it is not in its config (an environment variable): runs
    # that differ in it are not one group's seeds (their step times are not comparable).
    for key, config_key in MEASURED_UNDER.items():
        if key in results:
            run.config[config_key] = results[key]
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



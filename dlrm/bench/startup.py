"""Where the wall clock of a short run goes: start-up, steps and eval, and the exit.

Runs `python -m dlrm.train trainer.max_steps=N` (default config plus any overrides) as a user
types it, `--runs` times, and reads each run's timeline from its own files: the log line that
starts training (imports, config, data checks and the model built before it), results.json
(steps and the final eval before it) and the process's end (the exit after it). With `--against
DIR` (another checkout of this repository, e.g. `git worktree add /tmp/old <rev>`) its runs
alternate with this checkout's (A B B A ...), so a drifting machine hits both alike; both use
this interpreter (the same installed packages).

    python scripts/bench_startup.py                        # 3 runs of 20 steps
    python scripts/bench_startup.py --against /tmp/old --runs 4

Prints one JSON line: per checkout the median of each phase in seconds, and the runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _log_time(log: Path, needle: str) -> float:
    """Unix time of the first line of the run's log containing `needle`."""
    for line in log.read_text().splitlines():
        m = LOG_TIME.match(line)
        if m and needle in line:
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
    raise ValueError(f"{log}: no line with {needle!r}")


def one_run(checkout: Path, steps: int, overrides: list[str], out: Path) -> dict[str, float]:
    """Seconds from launch to training (`start_s`), to results.json (`train_eval_s`), to the
    process's end (`exit_s`), and in all (`wall_s`)."""
    cmd = [sys.executable, "-m", "dlrm.train", "trainer.progress=false", f"trainer.max_steps={steps}",
           f"hydra.run.dir={out}", *overrides]
    t0 = time.time()
    subprocess.run(cmd, cwd=checkout, check=True, capture_output=True)
    end = time.time()
    started = _log_time(out / "train.log", "training steps")
    written = (out / "results.json").stat().st_mtime
    return {"start_s": started - t0, "train_eval_s": written - started, "exit_s": end - written, "wall_s": end - t0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=3, help="runs per checkout")
    p.add_argument("--against", type=Path, help="another checkout, run alternately with this one")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    checkouts = {"this": ROOT, **({"against": args.against.resolve()} if args.against else {})}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            order = list(checkouts) if i % 2 == 0 else list(checkouts)[::-1]
            for name in order:
                runs[name].append(one_run(checkouts[name], args.steps, args.overrides, Path(tmp) / f"{name}{i}"))
    result = {
        name: {
            "checkout": str(checkouts[name]),
            **{k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]},
            "runs": [{k: round(v, 2) for k, v in r.items()} for r in rs],
        }
        for name, rs in runs.items()
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""The trainer's step with glibc's default malloc against dlrm/malloc.py's settings.

Each measurement is its own process (`scripts/bench_trainer_step.py`, batches held in memory,
the default config plus any overrides), with `DLRM_MALLOC=glibc` (glibc's defaults) or without
(freed memory kept mapped), in A B B A order so a drifting machine hits both alike. Prints each
one's median step and minor page faults per step, and the ratio.

    python scripts/bench_page_faults.py                    # default config, 40 batches per process
    python scripts/bench_page_faults.py --batches 60 trainer.precision=fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODES = {"glibc defaults": {"DLRM_MALLOC": "glibc"}, "kept (dlrm/malloc.py)": {}}


def measure(env: dict, batches: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dlrm.bench.trainer_step", "--batches", str(batches), *overrides]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=1, help="A B B A rounds")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    order = list(MODES)
    for _ in range(args.rounds):
        for mode in (*order, *reversed(order)):
            runs[mode].append(measure(MODES[mode], args.batches, args.overrides))
    out = {
        mode: {
            "median_ms": statistics.median(r["memory_ms"] for r in rs),
            "minflt_per_step": statistics.median(r["minflt_per_step"] for r in rs),
            "runs_ms": [r["memory_ms"] for r in rs],
        }
        for mode, rs in runs.items()
    }
    out["glibc_over_kept"] = out[order[0]]["median_ms"] / out[order[1]]["median_ms"]
    for mode in order:
        print(f"{mode}: median step {out[mode]['median_ms']:.1f} ms (runs {out[mode]['runs_ms']}), "
              f"{out[mode]['minflt_per_step']:.0f} minor page faults per step")
    print(f"glibc defaults / kept: {out['glibc_over_kept']:.2f}x")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

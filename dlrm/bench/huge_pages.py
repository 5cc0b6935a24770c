"""The trainer's step with its tables on 4 KiB pages against transparent huge pages (dlrm/malloc.py).

Both trainers live in one process and step on the same held batches, alternating A B B A per
batch (`dlrm/bench/trainer_step.py`'s side by side), so a drifting machine hits both alike; the
first one is built with huge pages, the second with `DLRM_HUGE_PAGES=off`. Also times the first
touch of the tables' memory (allocating and zeroing the default model's 2.35 GB of rows and
row-wise Adagrad state), which huge pages change too.

    python scripts/bench_huge_pages.py                          # default config, 60 batches
    python scripts/bench_huge_pages.py trainer.precision=fp32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from dlrm.bench.trainer_step import _rounded, _trainer, side_by_side


def _set_huge_pages(on: bool) -> None:
    os.environ["DLRM_HUGE_PAGES"] = "on" if on else "off"  # read at each table allocation


def _anon_huge_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")) / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=60, help="batches per measurement")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of each median")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m dlrm.train")
    args = p.parse_args(argv)
    built = {}
    with tempfile.TemporaryDirectory() as tb:
        _set_huge_pages(True)
        t0 = time.perf_counter()
        huge, _, train = _trainer(args.overrides, None, tb)
        built["huge pages"] = {"build_s": time.perf_counter() - t0, "anon_huge_mib": _anon_huge_mib()}
        _set_huge_pages(False)
        t0 = time.perf_counter()
        small, _, _ = _trainer(args.overrides, train, tb)
        built["4 KiB pages"] = {"build_s": time.perf_counter() - t0, "anon_huge_mib_after": _anon_huge_mib()}
        batches = train.epoch(0)
        held = [next(batches) for _ in range(args.batches)]
        steps = side_by_side({"4 KiB pages": small, "huge pages": huge}, held, args.warmup)
    result = {k: {**built[k], **steps[k]} for k in built} | {
        "speedup_of_medians": steps["ratio_of_medians"] ** -1,
        "speedup_of_minima": steps["ratio_of_minima"] ** -1,
    }
    print(json.dumps(_rounded(result)))
    return result


if __name__ == "__main__":
    main()

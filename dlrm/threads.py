"""Intra-op threads for helper threads: keep torch ops off a second OpenMP team.

Why this exists (measured 2026-11-30, docs/benchmarks.md "The step inside a run"): torch on CPU
runs its intra-op parallelism on libgomp. Each Python thread that runs a large enough torch op
gets its own OpenMP team of `torch.get_num_threads()` threads. Once the process has more OpenMP
threads than cores, libgomp "throttles" every team: idle workers stop spin-waiting after ~100
spins and sleep on a futex. The training step then puts its second OpenMP thread to sleep and
wakes it hundreds of times a step (about 490 voluntary context switches per step against 6 alone),
and a 2-core step got 1.5-2x slower as soon as the parquet loader thread had decoded one batch,
even while that thread sat idle on a full queue.

`torch.set_num_threads` cannot fix this from the helper thread: it is process-wide and would
also cut the training step to one thread. OpenMP's own `omp_set_num_threads` is per thread, so a
helper thread sets its own limit through libgomp directly.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger("dlrm")


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp that torch loaded into this process (found in /proc/self/maps), or None where
    torch runs on another threading backend (macOS, TBB/native builds, no /proc)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    return ctypes.CDLL(sorted(paths)[0]) if paths else None


def limit_this_thread(threads: int = 1) -> bool:
    """Run this thread's torch ops on at most `threads` OpenMP threads, leaving every other
    thread (the training step) at its `torch.set_num_threads` setting.

    Call it first thing in a helper thread (loader, prefetcher) that runs torch ops.
    Returns False (and changes nothing) where torch does not run on libgomp.
    """
    gomp = _libgomp()
    if gomp is None:
        return False
    torch.get_num_threads()  # torch sets a new thread's OpenMP limit on first use: do that first
    gomp.omp_set_num_threads(threads)
    return torch.get_num_threads() == threads

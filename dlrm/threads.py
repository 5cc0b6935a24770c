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

The same throttling hits a run whose threads share the cores with another process:
`warn_if_cores_busy` tells a run on every core when that is the case.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time

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


LOADER_NICE = 10  # DLRM_LOADER_NICE overrides; 0 leaves the loader at the step's priority


def lower_this_thread_priority() -> int:
    """Lower this helper thread's scheduling priority to at least nice `DLRM_LOADER_NICE` (default
    10; Linux schedules threads one by one) and return its nice value; 0 where set to 0, not an
    integer, or refused.

    Why (measured 2026-12-01, docs/benchmarks.md "Tables and interaction in C"): the loader
    decodes its next 4 row groups (0.24 s of CPU) every 128 steps while the step's two OpenMP
    threads hold both cores; at equal priority it takes a core from the step, whose threads then
    wait for each other at every barrier: 1.6-1.75 s of a default 1000-step run went to steps
    above the median. At nice 10 the decode runs mostly in the step's idle moments (0.5-0.7 s
    above the median, ~0.65 s more waiting for batches: ~0.4 s net). On a machine other jobs
    keep busy a low-priority loader gets less CPU: `DLRM_LOADER_NICE=0` there.
    """
    try:
        nice = int(os.environ.get("DLRM_LOADER_NICE", LOADER_NICE))
    except ValueError:
        log.warning("DLRM_LOADER_NICE=%r is not an integer: the loader keeps its priority",
                    os.environ["DLRM_LOADER_NICE"])
        return 0
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return 0
    tid = threading.get_native_id()  # Linux: this thread only
    try:
        # at least `nice`: a process started under a higher nice keeps it (lowering needs privileges)
        target = max(min(nice, 19), os.getpriority(os.PRIO_PROCESS, tid))
        os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:
        return 0
    return target


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


def busy_cores(interval: float = 0.1) -> float | None:
    """Cores other processes keep busy right now: /proc/stat's busy share over `interval` seconds
    (this process sleeps meanwhile), times the machine's cores. None where /proc/stat is absent."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def warn_if_cores_busy(threads: int) -> bool:
    """With `trainer.threads=0` (every core), warn when other processes already keep a core
    busy: OpenMP threads then wait for the one that is not scheduled. A new-user trial beside
    another job measured 730-1083 ms steps with 2 threads against 67 ms with
    `trainer.threads=1`. True if it warned."""
    busy = busy_cores() if threads >= 2 else None
    if busy is None or busy < 0.5:
        return False
    free = max(1, threads - round(busy))
    log.warning(
        "other processes keep %.1f of the %d cores busy: trainer.threads=%d can be many times "
        "faster than %d threads while they run", busy, os.cpu_count() or threads, free, threads,
    )
    return True

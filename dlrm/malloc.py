"""Keep freed memory in the process, so a training step does not page-fault its buffers back in.

glibc's malloc serves blocks above a (dynamic, 128 KiB to 32 MiB) threshold with `mmap` and
returns them to the OS on `free`, and trims the heap's top when more than 128 KiB is free. A
step's activations and gradients (a few MiB each at batch 2048) are freed and allocated again
every step, so every step faulted them in again page by page: about 3,700 minor page faults per
step of the default model (`getrusage` ru_minflt), 0.5 with the settings below. A page fault
costs 0.3-13 us on these VMs, so that was up to tens of ms a step (docs/benchmarks.md, "Page
faults"). PyTorch's CPU tuning guide reaches the same end by preloading jemalloc or tcmalloc;
this needs no extra library. `DLRM_MALLOC=glibc` in the environment leaves glibc's defaults (to
measure the difference: `scripts/bench_page_faults.py`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # the largest an int holds: the heap's free top is kept up to 2 GiB

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (above) for this process, once; True if glibc took
    both, False where the C library is not glibc or `DLRM_MALLOC=glibc` (nothing changes then). Freed memory stays
    mapped for the next allocation instead of going back to the OS: peak RSS is unchanged, RSS
    after a peak stays near it."""
    global _done
    if _done is None and os.environ.get("DLRM_MALLOC") == "glibc":
        _done = False
    if _done is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _done = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _done

"""Memory the steps touch: freed buffers kept in the process, tables on transparent huge pages.

Freed buffers (`keep_freed_memory`): a training step should not page-fault its buffers back in.

glibc's malloc serves blocks above a (dynamic, 128 KiB to 32 MiB) threshold with `mmap` and
returns them to the OS on `free`, and trims the heap's top when more than 128 KiB is free. A
step's activations and gradients (a few MiB each at batch 2048) are freed and allocated again
every step, so every step faulted them in again page by page: about 3,700 minor page faults per
step of the default model (`getrusage` ru_minflt), 0.5 with the settings below. A page fault
costs 0.3-13 us on these VMs, so that was up to tens of ms a step (docs/benchmarks.md, "Page
faults"). PyTorch's CPU tuning guide reaches the same end by preloading jemalloc or tcmalloc;
this needs no extra library. `DLRM_MALLOC=glibc` in the environment leaves glibc's defaults (to
measure the difference: `scripts/bench_page_faults.py`).

Huge pages (`advise_huge_pages`): a table lookup reads a few rows from each of thousands of
random pages of a 2.2 GB table; with 4 KiB pages nearly every row is a TLB miss and a page-table
walk (two-dimensional, so dearer, in a VM). Asking Linux for 2 MiB transparent huge pages
(`madvise(MADV_HUGEPAGE)`, before the memory is first touched) cut a Kaggle batch's table
gathers and updates 2.2x in a microbenchmark (docs/benchmarks.md, "Huge pages"). Intel's
PyTorch CPU tuning guide recommends transparent huge pages for the same reason. Only the
PyTorch-ops table kernel asks for them: our C table kernel prefetches its rows, page walks
included, and measured the same step on 4 KiB pages while huge pages cost 2.5 s of start-up.
`DLRM_HUGE_PAGES=off` leaves the 4 KiB pages (to measure the difference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # the largest an int holds: the heap's free top is kept up to 2 GiB

MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

_done: bool | None = None
_madvise = None


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


def huge_pages_available() -> bool:
    """True where `madvise(MADV_HUGEPAGE)` can give huge pages: Linux with transparent huge pages
    `always` or `madvise` (not `never`), glibc's `madvise` found, and `DLRM_HUGE_PAGES` not `off`."""
    global _madvise
    if os.environ.get("DLRM_HUGE_PAGES", "").lower() in ("off", "0", "false", "no"):
        return False
    if _madvise is None:
        try:
            with open(THP_ENABLED) as f:
                mode = f.read()
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            if "[never]" in mode:
                _madvise = False
        except (OSError, AttributeError):
            _madvise = False
    return bool(_madvise)


def advise_huge_pages(address: int, nbytes: int) -> int:
    """Ask for transparent huge pages over the 2 MiB-aligned part of the `nbytes` bytes at
    `address` (a CPU buffer not yet touched: pages already there stay 4 KiB until the kernel's
    background collapse). Returns the bytes advised: 0 when the buffer holds no whole huge page
    or `huge_pages_available()` is False. Raises OSError if `madvise` refuses the range."""
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start or not huge_pages_available():
        return 0
    if _madvise(start, end - start, MADV_HUGEPAGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_HUGEPAGE) of {end - start} bytes: {os.strerror(err)}")
    return end - start

"""dlrm/malloc.py: freed buffers stay mapped, so re-allocating them costs no page faults."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, torch
from dlrm.malloc import keep_freed_memory

def faults_of_allocating_8mib_buffers(n=20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(2 << 20)  # 8 MiB: served by mmap and unmapped on free by default
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_allocating_8mib_buffers()
assert keep_freed_memory() and keep_freed_memory()  # glibc took it; a second call is a no-op
faults_of_allocating_8mib_buffers(1)  # the first buffer is new memory either way
print(default, faults_of_allocating_8mib_buffers())
"""


def test_freed_buffers_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert default > 10 * 1000  # up to 2048 faults per 8 MiB buffer without it (16k measured)
    assert kept < 200


def test_dlrm_malloc_glibc_leaves_the_defaults():
    script = "from dlrm.malloc import keep_freed_memory; print(keep_freed_memory())"
    env = {**__import__("os").environ, "DLRM_MALLOC": "glibc"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


HUGE = """
import torch
from dlrm.malloc import advise_huge_pages, huge_pages_available
from dlrm.embeddings.table_kernel import BatchedTables

def anon_huge_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))

before = anon_huge_kib()
tables = BatchedTables([(1 << 20, 16)], [0], "rowwise_adagrad", 0.1)  # 64 MiB of rows, 4 MiB of state
print(huge_pages_available(), anon_huge_kib() - before, float(tables.weights_0.abs().sum()), float(tables.momentum1_0.sum()))
buffer = torch.empty(5 << 20, dtype=torch.uint8)  # 5 MiB: one or two whole 2 MiB pages inside
print(advise_huge_pages(buffer.data_ptr(), 4096), advise_huge_pages(buffer.data_ptr(), buffer.nbytes))
"""


def _huge(env_value):
    import os

    env = {**os.environ, "DLRM_HUGE_PAGES": env_value}
    out = subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, check=True, env=env).stdout
    (available, gained, weights, states), (small, aligned) = (line.split() for line in out.splitlines())
    return available == "True", int(gained), float(weights), float(states), int(small), int(aligned)


def test_table_rows_sit_on_huge_pages_where_linux_gives_them():
    import pytest

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    available, gained, weights, states, small, aligned = _huge("on")
    assert (weights, states) == (0.0, 0.0)  # still zeros
    assert small == 0  # less than one whole huge page: nothing advised
    if "[never]" in mode:
        assert not available and gained == 0
    else:
        assert available and aligned in (2 << 20, 4 << 20)
        assert gained >= 32 * 1024  # at least half of the 64 MiB table on 2 MiB pages


def test_dlrm_huge_pages_off_leaves_4k_pages():
    available, gained, weights, _, _, aligned = _huge("off")
    assert not available and aligned == 0 and weights == 0.0
    assert gained < 8 * 1024  # only what the rest of the process happened to get

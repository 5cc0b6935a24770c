"""dlrm: a DLRM trainer with swappable embedding backends.

Data flows one way: parquet -> loader -> Batch -> DLRM (embedding backend -> interaction -> MLPs)
-> loss -> optimizers; telemetry observes. See README.md.
"""

import os as _os

__version__ = "0.1.0"

# The CPUs this process may run on, read before torch loads OpenMP: with OMP_PROC_BIND set,
# libgomp binds the main thread to one CPU as it loads, and the affinity read after that says 1
# (then `trainer.threads=0` ran one thread, 2x slower on 2 cores; docs/benchmarks.md).
CPUS_AT_START = len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else (_os.cpu_count() or 1)

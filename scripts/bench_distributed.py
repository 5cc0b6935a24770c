#!/usr/bin/env python
"""The step plain, in DMP at world size 1, and under torchrun: see dlrm/bench/distributed.py."""
from dlrm.bench.distributed import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The trainer's step with glibc's default malloc vs freed memory kept: see dlrm/bench/page_faults.py."""
from dlrm.bench.page_faults import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training step time per embedding backend and table size: see dlrm/bench/steps.py."""
from dlrm.bench.steps import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Step time, hit rate and resident memory of emb=cached vs full: see dlrm/bench/cached.py and docs/benchmarks.md."""
from dlrm.bench.cached import main

if __name__ == "__main__":
    main()

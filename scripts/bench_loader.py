#!/usr/bin/env python
"""Parquet loader throughput: see dlrm/bench/loader.py."""
from dlrm.bench.loader import main

if __name__ == "__main__":
    main()

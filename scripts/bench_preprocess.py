#!/usr/bin/env python
"""Preprocessing throughput and memory (text -> parquet): see dlrm/bench/preprocess.py."""
from dlrm.bench.preprocess import main

if __name__ == "__main__":
    main()

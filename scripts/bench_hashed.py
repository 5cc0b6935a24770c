#!/usr/bin/env python
"""Step time and memory of emb=full / hashed / qr: see dlrm/bench/hashed.py and docs/benchmarks.md."""
from dlrm.bench.hashed import main

if __name__ == "__main__":
    main()

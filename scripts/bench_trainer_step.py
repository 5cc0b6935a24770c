#!/usr/bin/env python
"""The trainer's step with and without a live loader: see dlrm/bench/trainer_step.py."""
from dlrm.bench.trainer_step import main

if __name__ == "__main__":
    main()

"""Thin wrapper: see dlrm/bench/loader_gap.py."""

from dlrm.bench.loader_gap import main

if __name__ == "__main__":
    main()

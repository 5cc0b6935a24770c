#!/usr/bin/env python
"""The tables alone, our kernel against fbgemm's: see dlrm/bench/tables.py."""
from dlrm.bench.tables import main

if __name__ == "__main__":
    main()

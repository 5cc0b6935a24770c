#!/usr/bin/env python
"""Where the wall clock of a short run goes (start-up, steps and eval, exit): see dlrm/bench/startup.py."""
from dlrm.bench.startup import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The trainer's step with its tables on 4 KiB pages vs transparent huge pages: see dlrm/bench/huge_pages.py."""
from dlrm.bench.huge_pages import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The dot interaction alone, torchrec's vs ours: see dlrm/bench/interaction.py."""
from dlrm.bench.interaction import main

if __name__ == "__main__":
    main()

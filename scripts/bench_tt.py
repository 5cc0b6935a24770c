"""TT embedding kernel benchmark: see dlrm/bench/tt_kernel.py and docs/benchmarks.md.

    python scripts/bench_tt.py --threads 1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dlrm.bench.tt_kernel import main  # noqa: E402

if __name__ == "__main__":
    main()

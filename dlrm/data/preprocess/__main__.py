"""python -m dlrm.data.preprocess: see dlrm.data.preprocess.cli."""

import sys

from dlrm.data.preprocess.cli import main

sys.exit(main())

"""`python -m dlrm.report DIR [DIR ...]` (see dlrm/report/__init__.py)."""

import sys

from dlrm.report import main

sys.exit(main())

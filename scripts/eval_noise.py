#!/usr/bin/env python
"""Where the seeds' AUC spread comes from (eval-sample or training noise): see dlrm/report/eval_noise.py."""
from dlrm.report.eval_noise import main

if __name__ == "__main__":
    main()

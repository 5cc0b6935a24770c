#!/usr/bin/env python
"""Criteo text (Kaggle train.txt, Terabyte day_N, plain or .gz) -> parquet: see dlrm/data/preprocess/."""
import sys

from dlrm.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())

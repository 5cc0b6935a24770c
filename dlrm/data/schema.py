"""The Criteo click-log schema shared by the generator, preprocessing and the loader.

A Criteo row is: label, 13 integer count features I1..I13 (may be missing or negative) and
26 categorical features C1..C26. In our parquet layout every feature is one column; categorical
ids are int64 in [0, rows of that feature's table) (or list<int64> for multi-hot features), and
the table sizes live in a sidecar `meta.json` beside the parquet files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dlrm.io import atomic_write_text

LABEL = "label"
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]

# Vocabulary sizes of the Criteo Kaggle Display Advertising Challenge after the reference DLRM
# preprocessing (the shapes TT-Rec and most papers report on).
KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip

META_FILE = "meta.json"


@dataclass
class DatasetMeta:
    """What the loader needs to know about a parquet dataset beyond its columns."""

    cardinalities: dict[str, int]  # sparse feature -> table rows
    splits: dict[str, list[str]]  # split name ("train", "eval") -> parquet files, relative
    rows: dict[str, int] = field(default_factory=dict)  # split -> row count
    multi_hot: dict[str, int] = field(default_factory=dict)  # feature -> max ids per row (0 = single)
    extra: dict = field(default_factory=dict)  # e.g. teacher AUC of a synthetic dataset

    def save(self, directory: Path) -> None:
        # Write-then-rename, so a crash never leaves a half-written meta.json that looks valid.
        atomic_write_text(Path(directory) / META_FILE, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> "DatasetMeta":
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {META_FILE}; is {directory} a dataset directory?")
        return cls(**json.loads(path.read_text()))

"""Built-in synthetic Criteo-shaped data: the default dataset, generated on first use.

Rows look like Criteo's: 13 heavy-tailed integer counts (some missing, a few negative) and 26
categorical ids drawn from bounded Zipf distributions over the Criteo Kaggle vocabulary sizes
(capped by `max_cardinality` for quick runs). Categorical ids are frequency-ordered, as
preprocessing produces them: id 0 is the most popular value of its feature.

Labels come from a hidden *teacher*, a logistic model with

- a per-category effect for every id of every feature (so a model must learn per-id embeddings,
  and merging ids by compression costs measurable AUC),
- a few low-rank interactions between pairs of features (what DLRM's dot interaction models),
- linear terms on log-transformed dense counts,

and a bias solved so that the click rate is `click_rate` (Criteo: about 25%). The teacher's own
AUC on the eval split is stored in meta.json as the ceiling a model can reach.

Per-id effects are not stored anywhere: they are a hash of (seed, feature, id), so a 10M-row
vocabulary costs no memory. Everything is deterministic from `seed`, chunk by chunk, so the
dataset is the same whoever generates it and however it is chunked into files.

Example::

    spec = SyntheticSpec(rows=100_000, eval_rows=10_000, max_cardinality=1000)
    path = ensure_dataset(spec, Path("data"))    # generates once, then reuses
    DatasetMeta.load(path).extra["teacher_auc"]
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchmetrics.functional.classification import binary_auroc

from dlrm.data.schema import DENSE, KAGGLE_CARDINALITIES, LABEL, SPARSE, DatasetMeta
from dlrm.io import atomic_path

log = logging.getLogger(__name__)

# Teacher structure. Effects are scaled so that no single feature dominates and the teacher's
# AUC lands near real CTR models (~0.8): a model that learns the embeddings can get close to it,
# one that merges ids cannot.
EFFECT_STD = 0.3  # per-category effect, per feature
LATENT_DIM = 4  # rank of each pairwise interaction
INTERACTION_STD = 0.4  # scale of each pairwise interaction term
INTERACTING_PAIRS = [(2, 3), (11, 15), (20, 23), (0, 9), (4, 25), (13, 16)]  # (C3,C4), (C12,C16), ...
DENSE_WEIGHTS = np.array([0.3, -0.2, 0.25, 0.0, -0.15, 0.2, 0.1, -0.1, 0.15, 0.0, 0.2, -0.05, 0.1])
# Dense counts: log-normal with these log-means; share missing per column (Criteo-like rates).
DENSE_LOG_MEAN = np.array([0.5, 2.0, 1.5, 1.5, 7.0, 3.0, 1.5, 2.0, 3.5, 0.2, 1.0, 0.1, 1.5])
DENSE_MISSING = np.array([0.45, 0.0, 0.2, 0.2, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.2])


@dataclass(frozen=True)
class SyntheticSpec:
    """Every setting that changes the generated data (and so the dataset's directory name)."""

    rows: int = 2_097_152
    eval_rows: int = 200_000
    max_cardinality: int = 0  # 0 = Criteo Kaggle sizes
    seed: int = 0
    zipf: float = 1.05
    click_rate: float = 0.25
    row_group_rows: int = 65536
    rows_per_file: int = 1_048_576
    # feature -> max ids per row; a multi-hot feature gets 1..max ids per row (list<int64> column)
    multi_hot: dict[str, int] = field(default_factory=dict)
    # feature -> table rows, replacing its Kaggle size (and the cap), e.g. {C3: 200_000_000} for
    # one table larger than RAM
    table_rows: dict[str, int] = field(default_factory=dict)

    def cardinalities(self) -> list[int]:
        cap = self.max_cardinality
        sizes = [min(c, cap) if cap > 0 else c for c in KAGGLE_CARDINALITIES]
        return [self.table_rows.get(name, c) for name, c in zip(SPARSE, sizes)]

    def fingerprint(self) -> str:
        fields = asdict(self)
        if not fields["table_rows"]:  # keeps the names of datasets made before the field existed
            del fields["table_rows"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def validate(self) -> None:
        for key in ("rows", "eval_rows", "row_group_rows", "rows_per_file"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key}={getattr(self, key)} must be > 0")
        if self.max_cardinality < 0:
            raise ValueError(f"data.max_cardinality={self.max_cardinality} must be >= 0 (0 = no cap)")
        if not 0.0 < self.click_rate < 1.0:
            raise ValueError(f"data.click_rate={self.click_rate} must be in (0, 1)")
        if self.zipf <= 0:
            raise ValueError(f"data.zipf={self.zipf} must be > 0")
        for key in ("multi_hot", "table_rows"):
            unknown = set(getattr(self, key)) - set(SPARSE)
            if unknown:
                raise ValueError(f"data.{key} names unknown features {sorted(unknown)}")
        for name, rows in self.table_rows.items():
            if not isinstance(rows, int) or rows <= 0:
                raise ValueError(f"data.table_rows.{name}={rows} must be a positive integer")


# ---------------------------------------------------------------------------------------------
# Deterministic randomness


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (splitmix64's finalizer); uint64 arithmetic wraps as intended."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """U(-sqrt(3), sqrt(3)) (mean 0, variance 1) as a pure function of (seed, stream, id)."""
    key = np.uint64((seed * 1_000_003 + stream) * 0x2545F4914F6CDD1D % (1 << 64))
    with np.errstate(over="ignore"):
        h = _splitmix64(ids.astype(np.uint64) ^ _splitmix64(np.array([key], dtype=np.uint64)))
    unit = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return (unit * 2.0 - 1.0) * np.sqrt(3.0)


def zipf_ids(rng: np.random.Generator, n_ids: int, size: int, s: float) -> np.ndarray:
    """Ids in [0, n_ids) with P(id) ~ (id + 1)^-s: inverse CDF of a bounded continuous power law."""
    u = rng.random(size)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n_ids + 1.0))
    else:
        a = 1.0 - s
        x = (u * ((n_ids + 1.0) ** a - 1.0) + 1.0) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, n_ids - 1).clip(0)


# ---------------------------------------------------------------------------------------------
# The generator


class Teacher:
    """The hidden logistic model that labels the rows."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.bias = 0.0

    def _feature_effect(self, f: int, ids: np.ndarray | list) -> np.ndarray:
        if isinstance(ids, np.ndarray):
            return EFFECT_STD * hashed_uniform(self.spec.seed, f, ids)
        # multi-hot: mean effect of the row's ids
        return np.array([EFFECT_STD * hashed_uniform(self.spec.seed, f, r).mean() for r in ids])

    def _latent(self, f: int, ids: np.ndarray | list) -> np.ndarray:
        first = ids if isinstance(ids, np.ndarray) else np.array([r[0] for r in ids])
        cols = [hashed_uniform(self.spec.seed, 1000 + 16 * f + j, first) for j in range(LATENT_DIM)]
        return np.stack(cols, axis=1) / np.sqrt(LATENT_DIM)

    def logits(self, dense: np.ndarray, sparse: list) -> np.ndarray:
        """Logit per row; `dense` [n, 13] float (NaN = missing), `sparse` one id array per feature."""
        z = np.full(len(dense), self.bias)
        for f, ids in enumerate(sparse):
            z += self._feature_effect(f, ids)
        for f, g in INTERACTING_PAIRS:
            z += INTERACTION_STD * (self._latent(f, sparse[f]) * self._latent(g, sparse[g])).sum(1) * 2
        x = np.log1p(np.nan_to_num(np.maximum(dense, 0.0), nan=0.0))
        z += ((x - DENSE_LOG_MEAN) * DENSE_WEIGHTS).sum(1) * 0.5
        return z

    def calibrate(self, dense: np.ndarray, sparse: list) -> None:
        """Solve for the bias that gives the target click rate (bisection on the mean)."""
        z0 = self.logits(dense, sparse) - self.bias
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            rate = (1.0 / (1.0 + np.exp(-(z0 + mid)))).mean()
            lo, hi = (mid, hi) if rate < self.spec.click_rate else (lo, mid)
        self.bias = (lo + hi) / 2


def _rows(spec: SyntheticSpec, split: int, chunk: int, n: int, teacher: Teacher | None):
    """Generate one chunk: (label, dense, sparse, probability). Seeded by (seed, split, chunk)."""
    rng = np.random.default_rng([spec.seed, split, chunk])
    cards = spec.cardinalities()
    dense = np.floor(np.exp(rng.normal(DENSE_LOG_MEAN, 1.2, size=(n, 13)))) - 1.0
    dense[:, 1] -= (rng.random(n) < 0.05) * rng.integers(1, 4, n)  # I2 has small negatives in Criteo
    dense[rng.random((n, 13)) < DENSE_MISSING] = np.nan
    sparse: list = []
    for f, (name, card) in enumerate(zip(SPARSE, cards)):
        hot = spec.multi_hot.get(name, 0)
        if hot > 1:
            lengths = rng.integers(1, hot + 1, n)
            flat = zipf_ids(rng, card, int(lengths.sum()), spec.zipf)
            sparse.append(np.split(flat, np.cumsum(lengths)[:-1]))
        else:
            sparse.append(zipf_ids(rng, card, n, spec.zipf))
    if teacher is None:
        return None, dense, sparse, None
    p = 1.0 / (1.0 + np.exp(-teacher.logits(dense, sparse)))
    label = (rng.random(n) < p).astype(np.int8)
    return label, dense, sparse, p


def _table(label: np.ndarray, dense: np.ndarray, sparse: list) -> pa.Table:
    cols = {LABEL: pa.array(label, pa.int8())}
    for j, name in enumerate(DENSE):
        col = dense[:, j]
        cols[name] = pa.array(np.nan_to_num(col, nan=0).astype(np.int64), mask=np.isnan(col))
    for name, ids in zip(SPARSE, sparse):
        cols[name] = pa.array(ids, pa.list_(pa.int64()) if isinstance(ids, list) else pa.int64())
    return pa.table(cols)


def generate(spec: SyntheticSpec, out: Path) -> DatasetMeta:
    """Write the dataset into `out` (train/ and eval/ parquet files + meta.json)."""
    spec.validate()
    teacher = Teacher(spec)
    _, dense, sparse, _ = _rows(spec, split=99, chunk=0, n=min(200_000, spec.rows), teacher=None)
    teacher.calibrate(dense, sparse)

    splits: dict[str, list[str]] = {}
    eval_p, eval_y = [], []
    for split_id, (split, n_rows) in enumerate([("train", spec.rows), ("eval", spec.eval_rows)]):
        files = []
        for file_idx, start in enumerate(range(0, n_rows, spec.rows_per_file)):
            rel = f"{split}/part-{file_idx:05d}.parquet"
            files.append(rel)
            n_file = min(spec.rows_per_file, n_rows - start)
            with pq.ParquetWriter(out / rel, _schema(spec), compression="none") as writer:
                for g, off in enumerate(range(0, n_file, spec.row_group_rows)):
                    chunk = (start + off) // spec.row_group_rows
                    n = min(spec.row_group_rows, n_file - off)
                    label, dense, sparse, p = _rows(spec, split_id, chunk, n, teacher)
                    writer.write_table(_table(label, dense, sparse), row_group_size=n)
                    if split == "eval":
                        eval_p.append(p)
                        eval_y.append(label)
        splits[split] = files

    p, y = np.concatenate(eval_p), np.concatenate(eval_y)
    teacher_auc = float(binary_auroc(torch.from_numpy(p), torch.from_numpy(y).long()))
    teacher_logloss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    names = dict(zip(SPARSE, spec.cardinalities()))
    return DatasetMeta(
        cardinalities=names,
        splits=splits,
        rows={"train": spec.rows, "eval": spec.eval_rows},
        multi_hot=dict(spec.multi_hot),
        extra={
            "generator": "synthetic",
            "spec": asdict(spec),
            "teacher_auc": teacher_auc,
            "teacher_logloss": teacher_logloss,
            "click_rate": float(y.mean()),
        },
    )


def _schema(spec: SyntheticSpec) -> pa.Schema:
    fields = [pa.field(LABEL, pa.int8())] + [pa.field(n, pa.int64()) for n in DENSE]
    for name in SPARSE:
        multi = spec.multi_hot.get(name, 0) > 1
        fields.append(pa.field(name, pa.list_(pa.int64()) if multi else pa.int64()))
    return pa.schema(fields)


def ensure_dataset(spec: SyntheticSpec, root: Path) -> Path:
    """The dataset's directory under `root`, generated first if it is not there yet.

    Generation writes into a temporary directory renamed into place at the end, so an
    interrupted run never leaves a dataset that looks complete.
    """
    spec.validate()
    path = Path(root) / f"synthetic-{spec.fingerprint()}"
    if (path / "meta.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel sweep jobs may all ask for the same dataset: one generates, the others wait.
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "meta.json").is_file():
            return path
        with atomic_path(path) as tmp:  # removed on error; renamed whole into place on success
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
            (tmp / "train").mkdir(parents=True)
            (tmp / "eval").mkdir()
            log.info("generating synthetic dataset (%d + %d rows) into %s", spec.rows, spec.eval_rows, path)
            meta = generate(spec, tmp)
            meta.save(tmp)
    return path

"""Encoders: values -> ids (built once per worker process and reused for every chunk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dlrm.data.preprocess.keys import ColumnKeys, mix64, string_hash64
from dlrm.data.preprocess.settings import VOCAB
from dlrm.data.schema import SPARSE

SMALL_VOCAB = 1 << 20  # up to this many keys a hash index (pandas) is built per worker; beyond,
# binary search in the memory-mapped sorted keys (shared between workers via the page cache)


class VocabEncoder:
    """Looks values up in the merged vocabulary (vocab/<C>.keys.npy sorted, .ids.npy)."""

    def __init__(self, out: Path):
        self.keys, self.ids, self.other, self.index = {}, {}, {}, {}
        for c in SPARSE:
            self.keys[c] = np.load(out / VOCAB / f"{c}.keys.npy", mmap_mode="r")
            self.ids[c] = np.load(out / VOCAB / f"{c}.ids.npy", mmap_mode="r")
            if len(self.keys[c]) <= SMALL_VOCAB:
                # A hash lookup costs ~30 ns/value against ~100+ for sort + binary search.
                self.index[c] = pd.Index(np.asarray(self.keys[c]))
                self.ids[c] = np.asarray(self.ids[c])
            other = out / VOCAB / f"{c}.other.parquet"
            if other.exists():
                t = pq.read_table(other)
                self.other[c] = dict(zip(t["value"].to_pylist(), t["id"].to_pylist()))
            else:
                self.other[c] = {}

    def lookup(self, c: str, q: np.ndarray) -> np.ndarray:
        table, ids = self.keys[c], self.ids[c]
        if len(table) == 0 or len(q) == 0:
            return np.zeros(len(q), np.int64)
        if c in self.index:
            pos = self.index[c].get_indexer(q)
            return np.where(pos >= 0, ids[pos], 0)
        order = np.argsort(q)  # sorted needles: neighbouring searches touch neighbouring pages
        sq = q[order]
        pos = np.minimum(np.searchsorted(table, sq), len(table) - 1)
        out = np.empty(len(q), np.int64)
        out[order] = np.where(table[pos] == sq, ids[pos], 0)
        return out

    def __call__(self, c: str, ck: ColumnKeys, n: int) -> np.ndarray:
        out = np.zeros(n, np.int64)
        out[ck.rows8] = self.lookup(c, ck.keys)
        if len(ck.other_rows):
            other = self.other[c]
            out[ck.other_rows] = [other.get(v, 0) for v in ck.other]
        return out


class HashEncoder:
    def __init__(self, max_rows: int):
        self.buckets = np.uint64(max_rows - 1)

    def ids(self, keys: np.ndarray) -> np.ndarray:
        return (mix64(keys) % self.buckets + np.uint64(1)).astype(np.int64)

    def __call__(self, c: str, ck: ColumnKeys, n: int) -> np.ndarray:
        out = np.zeros(n, np.int64)
        out[ck.rows8] = self.ids(ck.keys)
        if len(ck.other_rows):
            out[ck.other_rows] = self.ids(string_hash64(ck.other))
        return out


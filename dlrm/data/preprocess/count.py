"""Counting values: per chunk (pass 1), and summing the counts of equal keys (the merge)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlrm.data.preprocess.keys import column_keys
from dlrm.data.preprocess.settings import COUNT_SCHEMA
from dlrm.data.schema import SPARSE

def count_batches(table: pa.Table) -> list[pa.RecordBatch]:
    """Per column: counts of its 8-byte values (batch c) and other strings (batch 26 + c)."""
    packed, other = [], []
    for c in SPARSE:
        ck = column_keys(table[c])
        vc = pc.value_counts(pa.array(ck.keys))  # hash aggregation; about 30 ns per value
        keys, counts = vc.field("values"), vc.field("counts").cast(pa.int64())
        packed.append(pa.record_batch([keys, pa.nulls(len(keys), pa.string()), counts], schema=COUNT_SCHEMA))
        agg = Counter(ck.other)
        other.append(
            pa.record_batch(
                [pa.array(np.zeros(len(agg), np.uint64)), pa.array(list(agg), pa.string()), pa.array(list(agg.values()), pa.int64())],
                schema=COUNT_SCHEMA,
            )
        )
    return packed + other


def merge_counts(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum counts of equal keys; returns sorted unique keys."""
    k = np.concatenate(keys)
    c = np.concatenate(counts).astype(np.int64)
    if len(k) == 0:
        return k.astype(np.uint64), c
    order = np.argsort(k)
    k, c = k[order], c[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return k[starts], np.add.reduceat(c, starts)


"""Vocabulary (vocab mode) and id counts (both modes): merged one column at a time, in workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from dlrm.data.preprocess.count import merge_counts
from dlrm.data.preprocess.files import save_npy, write_parquet
from dlrm.data.preprocess.settings import COUNTS, VOCAB
from dlrm.data.schema import SPARSE

def merge_column(out: str, ci: int, count_files: list[str], rows: int, min_count: int, max_rows: int) -> int:
    """Merge one column's per-chunk counts into vocab/<C>.{keys,ids}.npy (+ .other.parquet) and
    counts/<C>.npy. Merges in batches so memory stays about twice the column's vocabulary."""
    out, c = Path(out), SPARSE[ci]
    keys, counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    pend_k, pend_c, pending = [], [], 0
    other = Counter()
    for f in count_files:
        with pa.OSFile(str(out / f)) as src:  # read into memory: safe to use after close
            reader = pa.ipc.open_file(src)
            b = reader.get_batch(ci)
            pend_k.append(b.column(0).to_numpy())
            pend_c.append(b.column(2).to_numpy())
            pending += b.num_rows
            ob = reader.get_batch(len(SPARSE) + ci)
            if ob.num_rows:
                for v, n in zip(ob.column(1).to_pylist(), ob.column(2).to_pylist()):
                    other[v] += n
        if pending > max(2 * len(keys), 1 << 22):
            keys, counts = merge_counts([keys, *pend_k], [counts, *pend_c])
            pend_k, pend_c, pending = [], [], 0
    keys, counts = merge_counts([keys, *pend_k], [counts, *pend_c])

    # Order: count descending; ties: 8-byte values before other strings, then by value.
    keep = counts >= min_count
    keys, counts = keys[keep], counts[keep]
    okeys = sorted((v for v, n in other.items() if n >= min_count), key=lambda v: (-other[v], v))
    ocounts = np.array([other[v] for v in okeys], np.int64)
    by_rank = np.lexsort((keys, -counts))  # packed candidates in id order
    all_counts = np.concatenate([counts[by_rank], ocounts])
    kind = np.concatenate([np.zeros(len(keys), np.int8), np.ones(len(okeys), np.int8)])
    rank = np.concatenate([np.arange(len(keys)), np.arange(len(okeys))])
    order = np.lexsort((rank, kind, -all_counts))  # position in `order` + 1 = id
    n_ids = len(order) if max_rows <= 0 else min(len(order), max_rows - 1)
    ids_of = np.zeros(len(order), np.int64)
    ids_of[order[:n_ids]] = np.arange(1, n_ids + 1)  # values beyond the cap keep id 0
    packed_ids = np.zeros(len(keys), np.int64)
    packed_ids[by_rank] = ids_of[: len(keys)]  # keys are sorted ascending: ids in key order
    other_ids = ids_of[len(keys) :]

    cnt = np.zeros(n_ids + 1, np.int64)
    cnt[1:] = all_counts[order[:n_ids]]
    cnt[0] = rows - cnt[1:].sum()  # missing, rarer than min_count, or beyond the cap
    id_dtype = np.int32 if n_ids < 2**31 else np.int64
    present = packed_ids > 0
    (out / VOCAB).mkdir(exist_ok=True)
    (out / COUNTS).mkdir(exist_ok=True)
    save_npy(out / VOCAB / f"{c}.keys.npy", keys[present])
    save_npy(out / VOCAB / f"{c}.ids.npy", packed_ids[present].astype(id_dtype))
    if okeys:
        sel = other_ids > 0
        write_parquet(
            out / VOCAB / f"{c}.other.parquet",
            pa.table({"value": pa.array([v for v, s in zip(okeys, sel) if s], pa.string()), "id": pa.array(other_ids[sel])}),
            1 << 20,
        )
    save_npy(out / COUNTS / f"{c}.npy", cnt)
    return n_ids + 1


def hash_counts(out: str, ci: int, count_files: list[str], max_rows: int, dense_max_rows: int) -> int:
    """Hash mode: sum the per-chunk id counts of one column. Memory grows with the distinct ids
    that occur, never with max_rows. Written as counts/<C>.npy (int64 [max_rows], index = id) when
    max_rows <= dense_max_rows, else sparsely: counts/<C>.ids.npy (int64 [k], sorted ids that
    occur) and counts/<C>.counts.npy (int64 [k]); read either with load_counts."""
    out, c = Path(out), SPARSE[ci]
    ids, counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    pend_k, pend_c, pending = [], [], 0
    for f in count_files:
        with pa.OSFile(str(out / f)) as src:  # read into memory: safe to use after close
            b = pa.ipc.open_file(src).get_batch(ci)
        pend_k.append(b.column(0).to_numpy())
        pend_c.append(b.column(2).to_numpy())
        pending += b.num_rows
        if pending > max(2 * len(ids), 1 << 22):
            ids, counts = merge_counts([ids, *pend_k], [counts, *pend_c])
            pend_k, pend_c, pending = [], [], 0
    ids, counts = merge_counts([ids, *pend_k], [counts, *pend_c])
    ids = ids.astype(np.int64)
    if max_rows <= dense_max_rows:
        dense = np.zeros(max_rows, np.int64)
        dense[ids] = counts
        save_npy(out / COUNTS / f"{c}.npy", dense)
    else:
        save_npy(out / COUNTS / f"{c}.ids.npy", ids)
        save_npy(out / COUNTS / f"{c}.counts.npy", counts)
    return max_rows


def load_counts(counts_dir: str | Path, feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows per id of one feature, in either layout preprocessing writes: (ids int64 [k] sorted,
    counts int64 [k]) of the ids that occur. Raises FileNotFoundError naming the files looked for."""
    d = Path(counts_dir)
    if (d / f"{feature}.npy").is_file():
        dense = np.load(d / f"{feature}.npy")
        ids = np.flatnonzero(dense)
        return ids.astype(np.int64), dense[ids].astype(np.int64)
    if (d / f"{feature}.ids.npy").is_file():
        return np.load(d / f"{feature}.ids.npy"), np.load(d / f"{feature}.counts.npy")
    raise FileNotFoundError(f"{d}: neither {feature}.npy nor {feature}.ids.npy + {feature}.counts.npy")

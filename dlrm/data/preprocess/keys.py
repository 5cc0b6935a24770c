"""Keys: a categorical string -> uint64 (exact for 8-byte values), and the hash of hash mode."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa



@dataclass
class ColumnKeys:
    """One categorical column of a chunk as numbers: the rows holding an 8-byte value get its 8
    bytes packed big-endian into a uint64 key (exact, and key order = byte order); the rare rows
    holding a string of another length keep it as a Python string."""

    keys: np.ndarray  # uint64 [rows with an 8-byte value]
    rows8: np.ndarray  # bool [n]: which rows those are
    other_rows: np.ndarray  # int [m]: rows with a non-8-byte value
    other: list[str]  # [m]: their values
    # rows in neither: missing (id 0)


def column_keys(col: pa.ChunkedArray) -> ColumnKeys:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(arr)
    valid = ~arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(n, bool)
    bufs = arr.buffers()
    if pa.types.is_fixed_size_binary(arr.type):  # the fast path: one flat buffer of 8-byte values
        raw = np.frombuffer(bufs[1], np.uint8, count=8 * n, offset=8 * arr.offset) if n else np.zeros(0, np.uint8)
        keys = raw.view(">u8").astype(np.uint64)
        return ColumnKeys(keys[valid], valid, np.zeros(0, np.int64), [])
    # Strings (the general path): gather the 8-byte values from the Arrow buffers.
    offsets = np.frombuffer(bufs[1], np.int32, count=n + 1, offset=4 * arr.offset) if n else np.zeros(1, np.int32)
    data = np.frombuffer(bufs[2], np.uint8) if n and bufs[2] is not None else np.zeros(0, np.uint8)
    rows8 = valid & (np.diff(offsets) == 8)
    starts = offsets[:-1][rows8]
    keys = data[starts[:, None] + np.arange(8)].reshape(-1).view(">u8").astype(np.uint64)
    other_rows = np.flatnonzero(valid & ~rows8)
    other = arr.take(pa.array(other_rows)).to_pylist() if len(other_rows) else []
    return ColumnKeys(keys, rows8, other_rows, other)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads keys (8-hex values are far from uniform) before the modulo."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def string_hash64(strings: list[str]) -> np.ndarray:
    """Stable 64-bit key of strings that are not 8 bytes (rare in Criteo): blake2b, not hash()."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in strings],
        np.uint64,
    )


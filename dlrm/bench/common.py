"""What the benchmarks share: Zipf id samplers, Criteo-shaped batch builders, timers.

Ids are drawn from the bounded power law of the synthetic data (`dlrm.data.synthetic.zipf_ids`,
P(rank r) ~ (r + 1)^-alpha), optionally scattered over the table by Knuth's multiplicative hash
so that hot ids are not neighbours (real preprocessed ids need not be sorted by frequency).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.synthetic import zipf_ids as _power_law_ids
from dlrm.embeddings import TableSpec

SCATTER = 2654435761  # odd multiplier: a bijection of [0, rows) when gcd(SCATTER, rows) == 1


def zipf_ids(rng: np.random.Generator, rows: int, n: int, alpha: float = 1.05, scatter: bool = False) -> np.ndarray:
    """`n` int64 ids in [0, rows), Zipf(alpha)-ranked; with `scatter`, rank r is id r * SCATTER mod rows."""
    ranks = _power_law_ids(rng, rows, n, alpha)
    return (ranks * SCATTER) % rows if scatter else ranks


def zipf_kjt(
    tables: list[TableSpec],
    batch_size: int,
    rng: np.random.Generator,
    alpha: float = 1.05,
    scatter: bool = False,
    hot: int = 1,
) -> KeyedJaggedTensor:
    """A key-major KJT of `batch_size` bags of `hot` Zipf ids per feature of `tables`."""
    keys = [f for t in tables for f in t.features]
    values = [
        torch.from_numpy(zipf_ids(rng, t.rows, batch_size * hot, alpha, scatter))
        for t in tables
        for _ in t.features
    ]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        offsets=torch.arange(0, len(keys) * batch_size * hot + 1, hot),
        stride=batch_size,
    )


def dlrm_batch(tables: list[TableSpec], batch_size: int, rng: np.random.Generator, alpha: float = 1.05):
    """(dense [B, 13], KJT, labels [B]): a Criteo-shaped training batch (25% clicks)."""
    kjt = zipf_kjt(tables, batch_size, rng, alpha)
    dense = torch.from_numpy(np.log1p(rng.exponential(5.0, (batch_size, 13))).astype(np.float32))
    labels = torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32))
    return dense, kjt, labels


def timings(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """(wall ms, thread CPU ms) of each of `repeats` calls of `fn`, after `warmup` untimed calls.

    Thread CPU time leaves out time spent waiting for a core: the steadier figure on a shared
    machine (with one thread it equals wall time on an idle one)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return wall, cpu


def time_each(step: Callable[[object], object], items, warmup: int = 0) -> list[float]:
    """Wall ms of `step(item)` for each of `items` (an iterable: batches), the first `warmup` left out."""
    times = []
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        step(item)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `fn` in ms (see `timings`)."""
    return statistics.median(timings(fn, repeats, warmup)[0])

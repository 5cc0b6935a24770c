"""Streaming parquet loader: row groups -> shuffled `Batch`es, read ahead in a background thread.

Never holds more than `buffer_row_groups` row groups (plus the queue) in memory. Per epoch the
order of (file, row group) pairs is shuffled by (seed, epoch), and rows are shuffled within the
read-ahead buffer, so a run is reproducible from its seed. The background thread spends its time
in pyarrow and numpy, which release the GIL, so reading overlaps the training step.

Example::

    loader = ParquetLoader(path, "train", batch_size=2048, seed=1)
    for batch in loader.epoch(0):     # exactly every row of the split once
        model(batch.dense, batch.sparse)
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.schema import DENSE, LABEL, SPARSE, DatasetMeta


@dataclass
class Batch:
    """One training batch: dense [B, 13] float, sparse KJT (26 keys, key-major), labels [B] float."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        if device.type == "cpu":
            return self
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "Batch":
        return Batch(self.dense.pin_memory(), self.sparse.pin(), self.labels.pin_memory())


def transform_dense(table: pa.Table) -> np.ndarray:
    """[13, n] float32: log(1 + max(x, 0)) per Criteo convention, missing values as 0.

    Feature-major, so each column lands in contiguous memory (writing into a row-major [n, 13]
    array column by column was the loader's slowest step).
    """
    x = np.empty((len(DENSE), table.num_rows), dtype=np.float32)
    for j, name in enumerate(DENSE):
        x[j] = table.column(name).fill_null(0).to_numpy()
    np.maximum(x, 0.0, out=x)
    return np.log1p(x, out=x)


class _Chunk:
    """A decoded slab of rows in numpy, put into `order` once, then cut into batches.

    Permuting the whole slab once (one gather per column) makes every batch a contiguous slice,
    which is cheaper than a random gather per batch.
    """

    def __init__(self, table: pa.Table, max_rows: dict[str, int], order: np.ndarray) -> None:
        self.order = order
        self.labels = table.column(LABEL).to_numpy().astype(np.float32)[order]
        self.dense = transform_dense(table)[:, order]  # [13, n]: gathered row by row, like ids
        self.multi: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # feature -> (offsets, values)
        # Single-hot ids feature-major [26, n]: a batch's KJT values are 26 contiguous runs.
        ids = np.zeros((len(SPARSE), table.num_rows), dtype=np.int64)
        for f, name in enumerate(SPARSE):
            col = table.column(name).combine_chunks()
            cap = max_rows.get(name)
            if pa.types.is_list(col.type):
                values = _cap(col.values.to_numpy().astype(np.int64), cap)
                self.multi[name] = (col.offsets.to_numpy().astype(np.int64), values)
            else:
                ids[f] = _cap(col.to_numpy(), cap)
        self.ids = ids[:, order]
        # As tensors, a chunk crosses from a DataLoader worker through shared memory, not a pipe.
        self.labels, self.dense, self.ids = map(torch.from_numpy, (self.labels, self.dense, self.ids))

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            yield self.batch(start, min(start + batch_size, len(self)))

    def batch(self, start: int, stop: int) -> Batch:
        """Rows start..stop (in this chunk's order) as a Batch with a key-major KJT."""
        n = stop - start
        if not self.multi:  # the common single-hot case: offsets are just 0..26n
            kjt = KeyedJaggedTensor(
                keys=SPARSE,
                values=self.ids[:, start:stop].reshape(-1),
                offsets=_single_hot_offsets(len(SPARSE) * n),
                stride=n,
            )
        else:
            index = self.order[start:stop]  # multi-hot columns stay in file order
            values, lengths = [], []
            for f, name in enumerate(SPARSE):
                if name not in self.multi:
                    values.append(self.ids[f, start:stop].numpy())
                    lengths.append(np.ones(n, dtype=np.int64))
                    continue
                offsets, flat = self.multi[name]
                starts, lens = offsets[index], offsets[index + 1] - offsets[index]
                # positions start..start+len-1 of every selected row, concatenated
                pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
                values.append(flat[pos])
                lengths.append(lens)
            kjt = KeyedJaggedTensor(
                keys=SPARSE,
                values=torch.from_numpy(np.concatenate(values)),
                lengths=torch.from_numpy(np.concatenate(lengths)),
                stride=n,
            )
        return Batch(self.dense[:, start:stop].T.contiguous(), kjt, self.labels[start:stop])


class _EpochShards(torch.utils.data.IterableDataset):
    """One epoch of a ParquetLoader, split across DataLoader worker processes by buffer."""

    def __init__(self, loader: "ParquetLoader", epoch: int) -> None:
        self.loader, self.epoch = loader, epoch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        shard, shards = (info.id, info.num_workers) if info else (0, 1)
        return self.loader._chunks(self.epoch, shard, shards)


@functools.lru_cache(maxsize=4)
def _single_hot_offsets(n: int) -> torch.Tensor:
    """0..n, shared by every full single-hot batch (read-only; built once per size)."""
    return torch.arange(n + 1)


def _cap(ids: np.ndarray, cap: int | None) -> np.ndarray:
    """Fold ids of a table larger than `data.max_rows` into the cap (load-time hashing)."""
    return ids if cap is None else ids % cap


class ParquetLoader:
    """Batches of one split of a parquet dataset (layout: see dlrm.data.schema)."""

    def __init__(
        self,
        path: str | Path,
        split: str,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        max_rows: int = 0,
        buffer_row_groups: int = 4,
        prefetch: int = 8,
        pin_memory: bool = False,
        workers: int = 0,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"data path {self.path} does not exist or is not a directory")
        self.meta = DatasetMeta.load(self.path)
        if split not in self.meta.splits:
            raise ValueError(f"{self.path}: no split {split!r} (has {sorted(self.meta.splits)})")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        self.files = [self.path / f for f in self.meta.splits[split]]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_row_groups = buffer_row_groups
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        if workers < 0:
            raise ValueError(f"data.workers={workers} must be >= 0 (0 = one background thread)")
        self.workers = workers
        self.cardinalities = dict(self.meta.cardinalities)
        # Load-time hashing: tables larger than the cap are folded into it.
        self.max_rows = {
            k: max_rows for k, v in self.cardinalities.items() if max_rows > 0 and v > max_rows
        }
        for k, cap in self.max_rows.items():
            self.cardinalities[k] = cap
        self.dense_width = len(DENSE)
        self.row_groups = self._index_row_groups()
        self.num_rows = sum(n for _, _, n in self.row_groups)

    def _index_row_groups(self) -> list[tuple[Path, int, int]]:
        groups = []
        needed = [LABEL, *DENSE, *SPARSE]
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                md, names = pf.metadata, pf.schema_arrow.names  # arrow names: list columns too
            except FileNotFoundError:
                raise FileNotFoundError(f"{f}: listed in meta.json but missing") from None
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{f}: not a readable parquet file ({e})") from None
            missing = [c for c in needed if c not in names]
            if missing:
                raise ValueError(f"{f}: missing columns {missing}")
            groups += [(f, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        return groups

    def __len__(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return -(-self.num_rows // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Every row of the split exactly once, in an order fixed by (seed, epoch).

        With `workers` > 0, that many processes (torch's DataLoader) each decode every
        `workers`-th read-ahead buffer of the epoch's order and send it whole (one transfer per
        buffer: per-batch transfers measured slower than one thread); the DataLoader takes them
        round-robin, so the order is still fixed by the seed. Each worker ends with its own short
        batch.
        """
        if self.workers > 0:
            chunks = torch.utils.data.DataLoader(
                _EpochShards(self, epoch),
                batch_size=None,  # items are decoded chunks, cut into batches here
                num_workers=self.workers,
                prefetch_factor=2,
            )
            for chunk in chunks:
                for batch in chunk.batches(self.batch_size):
                    yield batch.pin_memory() if self.pin_memory else batch
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce, args=(epoch, q, stop), daemon=True, name="parquet-loader"
        )
        worker.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    def _produce(self, epoch: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            batches = (b for chunk in self._chunks(epoch) for b in chunk.batches(self.batch_size))
            for batch in batches:
                if self.pin_memory:
                    batch = batch.pin_memory()
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # surfaced in the consumer thread
            q.put(e)

    def _chunks(self, epoch: int, shard: int = 0, num_shards: int = 1) -> Iterator["_Chunk"]:
        """The epoch's shuffled chunks of whole batches (the last may be short); with shards,
        only every `num_shards`-th read-ahead buffer."""
        n_groups = len(self.row_groups)
        group_rng = np.random.default_rng([self.seed, epoch])
        order = list(group_rng.permutation(n_groups) if self.shuffle else range(n_groups))
        leftover: pa.Table | None = None  # rows short of a full batch, carried into the next buffer
        files: dict[Path, pq.ParquetFile] = {}
        step = self.buffer_row_groups
        for start in range(shard * step, len(order), step * num_shards):
            # a chunk's row shuffle depends only on its position, so sharding cannot change it
            row_rng = np.random.default_rng([self.seed, epoch, start])
            tables = [] if leftover is None else [leftover]
            for i in order[start : start + step]:
                path, group, _ = self.row_groups[i]
                if path not in files:
                    files[path] = pq.ParquetFile(path)
                try:
                    tables.append(files[path].read_row_group(group))
                except (pa.ArrowInvalid, OSError) as e:
                    raise ValueError(f"{path}: row group {group} unreadable ({e})") from None
            table = pa.concat_tables(tables).combine_chunks()
            n = table.num_rows
            perm = row_rng.permutation(n) if self.shuffle else np.arange(n)
            full = n - n % self.batch_size
            if full:
                yield _Chunk(table, self.max_rows, perm[:full])
            leftover = table.take(pa.array(perm[full:])) if full < n else None
        if leftover is not None:  # the epoch's last, short batch: every row exactly once
            yield _Chunk(leftover, self.max_rows, np.arange(leftover.num_rows))

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
import itertools
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
from dlrm.threads import limit_this_thread, lower_this_thread_priority


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


def _column(table: pa.Table, name: str) -> torch.Tensor:
    """One column as one contiguous tensor, missing counts (I1..I13) as 0 per Criteo convention
    (labels and ids were checked for nulls when read: `_read`)."""
    col = table.column(name)
    if col.null_count:
        col = col.fill_null(0)
    # np.concatenate of the chunks measured 4x faster than ChunkedArray.to_numpy()
    return torch.from_numpy(np.concatenate([c.to_numpy() for c in col.chunks]))


def transform_dense(x: torch.Tensor) -> torch.Tensor:
    """log(1 + max(x, 0)) in place, per Criteo convention (negative counts clamp to 0)."""
    return x.clamp_(min=0).log1p_()


class _Chunk:
    """A decoded slab of rows, put into `order` once, then cut into batches.

    Permuting the whole slab once makes every batch a contiguous slice, which is cheaper than a
    random gather per batch. Each column is gathered on its own into one row of a feature-major
    output (a 1-D `index_select` per column): numpy's 2-D fancy index over [features, rows]
    measured ~18x slower, and was most of the loader's time.
    """

    def __init__(self, table: pa.Table, max_rows: dict[str, int], order: np.ndarray) -> None:
        n = len(order)
        self.order = order
        index = torch.from_numpy(order)

        def gather(name: str, out: torch.Tensor) -> None:
            src = _column(table, name).to(out.dtype)  # labels int8, counts int64 -> float32
            torch.index_select(src, 0, index, out=out)

        self.labels = torch.empty(n, dtype=torch.float32)
        gather(LABEL, self.labels)
        # Dense [13, n], ids [26, n]: feature-major, so a batch's KJT values are 26 contiguous runs.
        self.dense = torch.empty(len(DENSE), n, dtype=torch.float32)
        for j, name in enumerate(DENSE):
            gather(name, self.dense[j])
        transform_dense(self.dense)
        self.multi: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # feature -> (offsets, values)
        self.ids = torch.empty(len(SPARSE), n, dtype=torch.int64)  # multi-hot rows unused
        for f, name in enumerate(SPARSE):
            cap = max_rows.get(name)
            col = table.column(name)
            if pa.types.is_list(col.type):  # multi-hot columns stay in file order
                col = col.combine_chunks()
                values = _cap(col.values.to_numpy().astype(np.int64), cap)
                self.multi[name] = (col.offsets.to_numpy().astype(np.int64), values)
            else:
                gather(name, self.ids[f])
                if cap is not None:
                    self.ids[f].remainder_(cap)
        # As tensors, a chunk crosses from a DataLoader worker through shared memory, not a pipe.

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


def empty_batch() -> Batch:
    """A batch of 0 rows: what a rank with no rows left evaluates while the others finish."""
    kjt = KeyedJaggedTensor(
        keys=SPARSE, values=torch.empty(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64), stride=0
    )
    return Batch(torch.empty(0, len(DENSE)), kjt, torch.empty(0))


@functools.lru_cache(maxsize=4)
def _single_hot_offsets(n: int) -> torch.Tensor:
    """0..n, shared by every full single-hot batch (read-only; built once per size)."""
    return torch.arange(n + 1)


def _read(pf: pq.ParquetFile, path: Path, group: int) -> pa.Table:
    """One row group, with a clear error for an unreadable one or for missing labels or ids
    (a missing count means 0; a missing label or id has no such meaning, so never a silent 0)."""
    try:
        table = pf.read_row_group(group)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: row group {group} unreadable ({e})") from None
    nulls = [c for c in (LABEL, *SPARSE) if table.column(c).null_count]
    if nulls:
        raise ValueError(f"{path}: row group {group}: missing values in {nulls} (only I1..I13 may be missing)")
    return table


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
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
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
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if world_size > len(self.row_groups):
            raise ValueError(
                f"{self.path}: split {split!r} has {len(self.row_groups)} row groups, fewer than the "
                f"{world_size} processes that share them (write smaller row groups or use fewer processes)"
            )
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self._started: tuple | None = None  # (epoch, queue, stop, thread) of `start`

    def start(self, epoch: int) -> None:
        """Begin reading `epoch` in the background thread now (e.g. while the model is being
        built); the next `epoch(epoch)` takes over the batches read so far. A no-op with
        `workers` > 0 (their processes start with the DataLoader)."""
        if self.workers == 0 and self._started is None:
            self._started = (epoch, *self._start_thread(epoch))

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
        """Batches per epoch (the last one may be short); per rank when sharded (see `epoch`)."""
        if self.world_size == 1:
            return -(-self.num_rows // self.batch_size)
        return self._rank_batches(0)[1]

    def _epoch_order(self, epoch: int) -> list[int]:
        """Indices of all row groups in the order of `epoch` (fixed by seed and epoch)."""
        n_groups = len(self.row_groups)
        group_rng = np.random.default_rng([self.seed, epoch])
        return list(group_rng.permutation(n_groups) if self.shuffle else range(n_groups))

    def _rank_order(self, epoch: int) -> list[int]:
        """The row groups this rank reads in `epoch`: every world_size-th of the epoch's order."""
        return self._epoch_order(epoch)[self.rank :: self.world_size]

    def _rank_batches(self, epoch: int) -> tuple[int, int]:
        """(batches this rank's row groups make, batches every rank yields in `epoch`): the
        fewest over ranks, or with `pad` the most (plus one short batch per extra worker
        process). From the row-group index alone, so every rank agrees without communicating."""
        order = self._epoch_order(epoch)
        counts = [
            -(-sum(self.row_groups[i][2] for i in order[r :: self.world_size]) // self.batch_size)
            for r in range(self.world_size)
        ]
        if self.pad:
            return counts[self.rank], max(counts) + max(self.workers - 1, 0)
        return counts[self.rank], min(counts)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Every row of the split exactly once, in an order fixed by (seed, epoch).

        With `workers` > 0, that many processes (torch's DataLoader) each decode every
        `workers`-th read-ahead buffer of the epoch's order and send it whole (one transfer per
        buffer: per-batch transfers measured slower than one thread); the DataLoader takes them
        round-robin, so the order is still fixed by the seed. Each worker ends with its own short
        batch.

        Sharded (`world_size` > 1): this rank reads only its share of row groups (every
        world_size-th of the epoch's order), and every rank yields the same number of batches, so
        that collectives line up: the fewest any rank has (a few rows of the others are left out
        of the epoch), or with `pad` (evaluation) the most, topped up with empty batches so that
        every row is seen exactly once over all ranks.
        """
        if self.world_size == 1:
            yield from self._epoch(epoch)
            return
        target = self._rank_batches(epoch)[1]
        n = 0
        # pad: never cut (`target` covers every batch this rank can make)
        for batch in self._epoch(epoch) if self.pad else itertools.islice(self._epoch(epoch), target):
            n += 1
            yield batch
        for _ in range(target - n):
            yield empty_batch()

    def _epoch(self, epoch: int) -> Iterator[Batch]:
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
        started, self._started = self._started, None
        if started is not None and started[0] == epoch:
            q, stop, worker = started[1:]
        else:
            if started is not None:  # started for another epoch: stop that thread
                self._stop_thread(*started[1:])
            q, stop, worker = self._start_thread(epoch)
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop_thread(q, stop, worker)

    def stop(self) -> None:
        """Stop the thread of `start` if no epoch took it over (e.g. the run ended before training)."""
        started, self._started = self._started, None
        if started is not None:
            self._stop_thread(*started[1:])

    def _start_thread(self, epoch: int) -> tuple[queue.Queue, threading.Event, threading.Thread]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce, args=(epoch, q, stop), daemon=True, name="parquet-loader"
        )
        worker.start()
        return q, stop, worker

    @staticmethod
    def _stop_thread(q: queue.Queue, stop: threading.Event, worker: threading.Thread) -> None:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)

    def _produce(self, epoch: int, q: queue.Queue, stop: threading.Event) -> None:
        # a second OpenMP team for this thread's torch ops slows every training step, and so does
        # decoding at the step's priority (dlrm.threads)
        limit_this_thread(1)
        lower_this_thread_priority()
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
        order = self._rank_order(epoch)
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
                tables.append(_read(files[path], path, group))
            table = pa.concat_tables(tables)  # no copy; each column is joined once in _column
            n = table.num_rows
            perm = row_rng.permutation(n) if self.shuffle else np.arange(n)
            full = n - n % self.batch_size
            if full:
                yield _Chunk(table, self.max_rows, perm[:full])
            leftover = table.take(pa.array(perm[full:])) if full < n else None
        if leftover is not None:  # the epoch's last, short batch: every row exactly once
            yield _Chunk(leftover, self.max_rows, np.arange(leftover.num_rows))

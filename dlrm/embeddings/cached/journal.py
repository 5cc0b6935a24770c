"""The disk store's undo journal: `<table>.undo`, the old contents of every row written since the
last flush, so a crash rolls the store's files back to exactly that flush.

Format: a header (magic, version, floats per row, epoch), then one record per batch of rows
written for the first time since the last flush: a record header (magic, count, crc32 of the
payload), then the payload: ids int64[count], the old packed rows fp32[count, dim + width], the
old init bytes uint8[count]. Records are appended with an ordinary write *before* the rows they
protect change, so after a process crash the page cache holds every record before its rows. A
journal written in another epoch (left from a crash between a commit and the journal's deletion)
protects nothing; a torn last record (death mid-append) is ignored, as its rows were not written.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from dlrm.embeddings.base import FP32_BYTES, TableSpec
from dlrm.io import fsync_path

JOURNAL_HEADER = struct.Struct("<8sIIQ")  # magic, version, floats per row, epoch
JOURNAL_MAGIC, JOURNAL_VERSION = b"DLRMUNDO", 1
RECORD_HEADER = struct.Struct("<4sII")  # magic, count, crc32
RECORD_MAGIC = b"ROWS"
JOURNAL_CHUNK_ROWS = 1 << 16  # rows per record at most (~5 MB for dim 16 + 1 state float)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite all of `data` at `offset` (a write may be short)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_journal(file: Path, epoch: int, width: int) -> tuple[list[tuple[int, int]], int]:
    """(offset, count) of each complete record of a journal written in `epoch`, and the torn bytes.

    A journal from another epoch (or without a whole header) protects nothing: no records. Reading
    stops at the first incomplete or corrupt record: appends happen before the rows they protect
    change, so a record cut short by a crash protects rows that were never written.
    """
    size = file.stat().st_size
    records, end = [], JOURNAL_HEADER.size
    with open(file, "rb") as f:
        head = f.read(JOURNAL_HEADER.size)
        if len(head) < JOURNAL_HEADER.size:
            return [], len(head)
        magic, version, floats, file_epoch = JOURNAL_HEADER.unpack(head)
        if magic != JOURNAL_MAGIC or version != JOURNAL_VERSION or floats != width or file_epoch != epoch:
            return [], 0
        while end + RECORD_HEADER.size <= size:
            magic, count, crc = RECORD_HEADER.unpack(f.read(RECORD_HEADER.size))
            n = count * (8 + width * FP32_BYTES + 1)
            if magic != RECORD_MAGIC or end + RECORD_HEADER.size + n > size or zlib.crc32(f.read(n)) != crc:
                break
            records.append((end + RECORD_HEADER.size, count))
            end += RECORD_HEADER.size + n
    return records, size - end


class UndoJournal:
    """The journals of a disk store's tables under `path`, for rows of `dim + state_width` floats.

    Which rows are already journaled since the last flush is one bit per row: rows / 8 bytes per
    table (25 MB for 200M rows; zero pages until touched), counted in `bytes()`. `durable=True`
    fdatasyncs each append (then an OS crash or power loss also rolls back). `epoch` is the
    store's: set it when the store commits a flush.
    """

    def __init__(self, path: Path, tables: list[TableSpec], state_width: int, epoch: int, durable: bool) -> None:
        self.path, self.state_width, self.epoch, self.durable = path, state_width, epoch, durable
        self.spec = {t.name: t for t in tables}
        self._fd: dict[str, int] = {}
        self._end: dict[str, int] = {}  # bytes of whole records; a failed append is cut back here
        self._journaled = {t.name: np.zeros((t.rows + 7) // 8, np.uint8) for t in tables}

    def file(self, name: str) -> Path:
        return self.path / f"{name}.undo"

    def bytes(self) -> int:
        return sum(b.nbytes for b in self._journaled.values())

    def protect(self, name: str, ids: torch.Tensor, packed: torch.Tensor, written: torch.Tensor) -> None:
        """Append the old contents (`packed` rows, `written` init bytes) of the rows of `ids` not
        yet journaled since the last flush. Raises OSError before any of them is marked."""
        bits = self._journaled[name]
        ids_np = ids.numpy()
        new = ids_np[((bits[ids_np >> 3] >> (ids_np & 7)) & 1) == 0]
        if not len(new):
            return
        # No np.unique (a sort per batch): a repeated id would be journaled twice with the same
        # old contents, as its row is read before any of this batch's writes.
        # Records of at most JOURNAL_CHUNK_ROWS rows bound the copies a big flush makes. A chunk is
        # marked journaled at once: if a later one fails, its rows are still unchanged all the same.
        for start in range(0, len(new), JOURNAL_CHUNK_ROWS):
            chunk = new[start : start + JOURNAL_CHUNK_ROWS]
            old = torch.from_numpy(chunk)
            payload = b"".join([
                chunk.astype("<i8").tobytes(),
                packed.index_select(0, old).numpy().tobytes(),
                written.index_select(0, old).numpy().tobytes(),
            ])  # fmt: skip
            self._append(name, RECORD_HEADER.pack(RECORD_MAGIC, len(chunk), zlib.crc32(payload)) + payload)
            np.bitwise_or.at(bits, chunk >> 3, (1 << (chunk & 7)).astype(np.uint8))

    def _append(self, name: str, record: bytes) -> None:
        """Append `record` to the table's journal, or raise with the journal as it was before."""
        file = self.file(name)
        try:
            if name not in self._fd:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                t = self.spec[name]
                header = JOURNAL_HEADER.pack(JOURNAL_MAGIC, JOURNAL_VERSION, t.dim + self.state_width, self.epoch)
                try:
                    _write_all(fd, header, 0)
                    if self.durable:  # the new file's directory entry must survive too
                        fsync_path(self.path)
                except OSError:
                    os.close(fd)  # the next append starts the file again
                    raise
                self._fd[name], self._end[name] = fd, len(header)
            fd = self._fd[name]
            _write_all(fd, record, self._end[name])
            if self.durable:
                os.fdatasync(fd)
        except OSError as e:
            if name in self._fd:
                try:  # drop a partial record; the next append would overwrite it anyway
                    os.ftruncate(self._fd[name], self._end[name])
                except OSError:
                    pass
            raise OSError(
                e.errno, f"disk store {self.path}: cannot append to the undo journal {file.name} "
                f"({e.strerror}); no row of this batch was written, the store still rolls back to its last flush"
            ) from e
        self._end[name] += len(record)

    def drop(self) -> None:
        """Close and delete every journal: their epoch is over."""
        for name in self.spec:
            fd = self._fd.pop(name, None)
            if fd is not None:
                os.close(fd)
            self._end.pop(name, None)
            self.file(name).unlink(missing_ok=True)
            self._journaled[name] = np.zeros(self._journaled[name].shape, np.uint8)  # fresh zero pages, no sweep

    def replay(self, name: str, packed: torch.Tensor, written: torch.Tensor) -> tuple[int, int]:
        """Undo every write to table `name` that its journal of this epoch recorded: (rows
        restored, torn bytes ignored at the end)."""
        file = self.file(name)
        if not file.exists():
            return 0, 0
        width = self.spec[name].dim + self.state_width
        records, torn = read_journal(file, self.epoch, width)
        with open(file, "rb") as f:
            for offset, count in reversed(records):  # each id is in one record; reversed all the same
                f.seek(offset)
                payload = f.read(count * (8 + width * FP32_BYTES + 1))
                ids = torch.from_numpy(np.frombuffer(payload, "<i8", count).copy())
                rows = np.frombuffer(payload, "<f4", count * width, count * 8).reshape(count, width)
                flags = np.frombuffer(payload, np.uint8, count, count * (8 + width * FP32_BYTES))
                packed.index_copy_(0, ids, torch.from_numpy(rows.copy()))
                written.index_copy_(0, ids, torch.from_numpy(flags.copy()))
        return sum(c for _, c in records), torn

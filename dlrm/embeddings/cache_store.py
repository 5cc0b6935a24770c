"""Cold stores behind `emb=cached`: the full table (weights + optimizer state) in host memory or
in memory-mapped files on disk.

A store holds, per table, `weights [rows, dim]` and `state [rows, width]` (fp32; width 1 for
row-wise Adagrad, dim for Adagrad, 0 for SGD). Both stores expose them as CPU tensors, so the
cache reads and writes rows with the same `index_select` / indexed assignment; for the disk store
those tensors are views of `numpy.memmap`s, so only the pages touched stay resident.

Disk layout under `emb.path`: `<table>.rows.f32`, raw little-endian fp32 `[rows, dim + width]`,
each row's weights followed by its optimizer state (one page touched per row moved, not two),
`<table>.init.u8` (1 once a row was written), `<table>.undo` (the undo journal, below) and
`store.json`. The files are never swept: their blocks are reserved with `posix_fallocate` (they
read as zeros, and reserving 13.6 GB took 0.03 s on ext4), and a row that was never written reads
as its init, U(-1/sqrt(rows), 1/sqrt(rows)) from a counter-based hash of (table, id, column)
(`hash_init`), so building a 200M-row store writes no rows and only touched pages are read.
Those values are not torch's RNG stream (full.py's), only the same distribution; `load_weights`
replaces them.

Crash safety. Rows are written in place (evictions) between flushes, so the files alone would
mix the last flushed state with later write-backs after a crash. Before a row (or its init byte)
changes for the first time since the last flush, its old contents are appended to
`<table>.undo` with an ordinary write, and only then is the row written through the map: after a
process crash (kill -9, OOM, exception) the page cache holds every journal record before the row
it protects. `flush(step)` syncs the maps and files, then commits `store.json` (temp file, fsync,
rename, fsync of the dir) with `"clean": true`, the `step` and a new `epoch`, and only then drops
the journals. A journal thus holds each row written since the last flush once: at most
rows * (8 + 4 * (dim + width) + 1) bytes. `store.json` says `"clean": false` from the first write
after a flush (`mark_dirty`) until the next flush.

Reopening: `resume=False` creates a store and refuses a path that already holds one (nothing is
ever truncated); `resume=True` reopens it (same tables, rows, dims, state width) and replays a
journal written in the manifest's epoch (the run died after its last flush), which rolls the files
back to exactly the last flush. A journal from an older epoch is left from a crash between the
commit and its deletion and is ignored; a torn last record (death mid-append) is ignored, as its
rows were not written yet. `emb.durable` (`durable=True`, off by default) also fdatasyncs each
append before the rows change, which extends the guarantee to an OS crash or power loss (cost in
docs/benchmarks.md); without it, a power loss can leave any mix. Disk full: `check_writable`
wants room for the whole files up front and `posix_fallocate` then reserves their blocks (still
reading as zeros), so a write through the map never meets a full disk (that would be a SIGBUS);
a failing journal append raises before any row of its batch changes.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from dlrm.embeddings.base import FP32_BYTES, TableSpec
from dlrm.embeddings.tables import init_uniform_

log = logging.getLogger(__name__)

def hash_init(table_index: int, ids: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    """Deterministic U(-1/sqrt(rows), 1/sqrt(rows)) rows for `ids`: splitmix64 of the element index."""
    offset = ((table_index + 1) * 0x9E3779B97F4A7C15) % 2**64
    offset = offset - 2**64 if offset >= 2**63 else offset  # as int64
    x = ids.to(torch.int64).unsqueeze(1) * dim + torch.arange(dim) + offset
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64 (wraps, as intended)
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * -7723592293110705685  # 0x94D049BB133111EB as int64
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    unit = ((x >> 11) & ((1 << 24) - 1)).to(torch.float64) / (1 << 24)  # [0, 1)
    bound = 1.0 / math.sqrt(rows)
    return ((2 * unit - 1) * bound).to(torch.float32)


class HostStore:
    """Full tables plus optimizer state as ordinary tensors in host memory."""

    kind = "host"

    def __init__(self, tables: list[TableSpec], state_width: int) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        for t in tables:
            self.weights[t.name] = torch.empty(t.rows, t.dim)
            init_uniform_(self.weights[t.name], t.rows)
            self.state[t.name] = torch.zeros(t.rows, state_width)

    def read(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights[name].index_select(0, ids), self.state[name].index_select(0, ids)

    def write(self, name: str, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> None:
        self.weights[name].index_copy_(0, ids, w)
        if s is not None:
            self.state[name].index_copy_(0, ids, s)

    def resident_bytes(self) -> int:
        return sum(
            w.numel() * FP32_BYTES + s.numel() * FP32_BYTES
            for w, s in zip(self.weights.values(), self.state.values())
        )

    def flush(self, step: int | None = None) -> None:
        pass  # nothing outlives the process

    def describe(self) -> str:
        return "host memory"


def check_writable(path: Path, need_bytes: int) -> None:
    """One clear error before training if `path` cannot hold the store."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"emb.path={str(path)!r} is not a writable directory: {e}") from None
    free = shutil.disk_usage(path).free
    if need_bytes > free:
        raise ValueError(
            f"emb.path={str(path)!r}: the disk store needs {need_bytes / 2**30:.2f} GiB, "
            f"only {free / 2**30:.2f} GiB free"
        )


# Undo journal `<table>.undo`: a header, then one record per batch of rows written for the first
# time since the last flush: record header (magic, count, crc32 of the payload), then the payload:
# ids int64[count], the old packed rows fp32[count, dim + width], the old init bytes uint8[count].
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_journal(file: Path, epoch: int, width: int) -> tuple[list[tuple[int, int]], int]:
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


class DiskStore:
    """Full tables plus optimizer state in memory-mapped files under `path`, with an undo journal.

    `resume=False` creates the files and refuses a path that already holds a store; `resume=True`
    reopens one (same tables, rows, dims and state width), rolling it back to its last flush if
    the run that wrote it died after that flush. `committed_step` is the `step` of the last flush.
    `durable=True` fdatasyncs each journal append (also survives an OS crash / power loss).

    Which rows are already journaled since the last flush is one bit per row: rows / 8 bytes per
    table (25 MB for 200M rows), counted in `resident_bytes()` (zero pages until touched).
    """

    kind = "disk"

    def __init__(
        self,
        tables: list[TableSpec],
        state_width: int,
        path: Path,
        random_access: bool = True,
        resume: bool = False,
        durable: bool = False,
    ) -> None:
        self.path = Path(path)
        self.random_access = random_access
        self.durable = durable
        self.tables = tables
        self.state_width = state_width
        self.index = {t.name: i for i, t in enumerate(tables)}
        self.spec = {t.name: t for t in tables}
        self._maps: list[np.memmap] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.written: dict[str, torch.Tensor] = {}
        self.packed: dict[str, torch.Tensor] = {}
        self._journal_fd: dict[str, int] = {}
        self._journal_end: dict[str, int] = {}  # bytes of whole records; a failed append is cut back here
        self._journaled = {t.name: np.zeros((t.rows + 7) // 8, np.uint8) for t in tables}
        manifest = self.path / "store.json"
        if resume:
            if not manifest.exists():
                raise ValueError(f"emb.path={str(self.path)!r} holds no table store (store.json) to resume from")
            saved = self._check_manifest(json.loads(manifest.read_text()))
            self.epoch, self.committed_step = saved["epoch"], saved["step"]
            self._dirty = not saved["clean"]
            allocated = sum(self.rows_file(t.name).stat().st_blocks * 512 for t in tables)
            check_writable(self.path, self._file_bytes() - allocated)
            mode = "r+"
        else:
            if manifest.exists():
                raise ValueError(
                    f"emb.path={str(self.path)!r} already holds a table store (store.json); remove it, "
                    "choose another emb.path, or resume"
                )
            check_writable(self.path, self._file_bytes())
            self.epoch, self.committed_step, self._dirty = 0, None, True
            for t in tables:  # a journal without a store.json protects nothing
                self.journal_file(t.name).unlink(missing_ok=True)
            self._write_manifest(clean=False, epoch=0, step=None)
            mode = "w+"  # zero-filled files: Adagrad state starts at 0, no row written
        for t in tables:
            self.packed[t.name] = self._open(self.rows_file(t.name), (t.rows, t.dim + state_width), mode)
            self.weights[t.name] = self.packed[t.name][:, : t.dim]
            self.state[t.name] = self.packed[t.name][:, t.dim :]
            self.written[t.name] = self._open(self.init_file(t.name), (t.rows,), mode, np.uint8)
        if resume:
            self._roll_back()

    # ------------------------------------------------------------------ files

    def init_file(self, name: str) -> Path:
        return self.path / f"{name}.init.u8"

    def rows_file(self, name: str) -> Path:
        return self.path / f"{name}.rows.f32"

    def journal_file(self, name: str) -> Path:
        return self.path / f"{name}.undo"

    def _file_bytes(self) -> int:
        return sum(t.rows * (t.dim + self.state_width) * FP32_BYTES for t in self.tables)

    def _open(self, file: Path, shape: tuple[int, ...], mode: str, dtype=np.float32) -> torch.Tensor:
        mm = np.memmap(file, dtype=dtype, mode=mode, shape=shape)
        self._reserve(file, mm.nbytes)
        # Rows are read and written at random: without MADV_RANDOM each page fault maps ~16
        # pages around it (fault-around / readahead): 6.1 GB of file pages instead of 0.8 GB on
        # the 200M-row benchmark, but ~1.3-1.5x faster steps while the file fits in RAM.
        if self.random_access and hasattr(mmap, "MADV_RANDOM") and getattr(mm, "_mmap", None) is not None:
            mm._mmap.madvise(mmap.MADV_RANDOM)
        self._maps.append(mm)
        return torch.from_numpy(mm)

    def _reserve(self, file: Path, nbytes: int) -> None:
        """Allocate the file's blocks now (they still read as zeros). A write through the map
        into an unallocated block of a full disk is a SIGBUS, a crash; this fails here instead,
        with one clear error, before training starts."""
        with open(file, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"disk store {self.path}: cannot reserve {nbytes / 2**30:.2f} GiB for {file.name} "
                    f"({e.strerror})",
                ) from None

    def _check_manifest(self, saved: dict) -> dict:
        """The saved manifest, if it describes the tables this run asks for; else a clear error."""
        where = f"emb.path={str(self.path)!r}"
        names = [t.name for t in self.tables]
        if list(saved["tables"]) != names:
            raise ValueError(f"{where}: store.json holds tables {list(saved['tables'])}, this run has {names}")
        for t in self.tables:
            s = saved["tables"][t.name]
            if (s["rows"], s["dim"]) != (t.rows, t.dim):
                raise ValueError(
                    f"{where}: table {t.name} is {s['rows']} rows x {s['dim']} in store.json, "
                    f"{t.rows} x {t.dim} in this run"
                )
        if saved["state_width"] != self.state_width:
            raise ValueError(
                f"{where}: store.json holds {saved['state_width']} optimizer state floats per row, this "
                f"run's optimizer needs {self.state_width} (optim.sparse.name)"
            )
        for t in self.tables:
            for file, size in [(self.rows_file(t.name), t.rows * (t.dim + self.state_width) * FP32_BYTES),
                               (self.init_file(t.name), t.rows)]:  # fmt: skip
                have = file.stat().st_size if file.exists() else None
                if have != size:
                    raise ValueError(f"{where}: {file.name} has {have} bytes, store.json implies {size}")
        return {"epoch": saved.get("epoch", 0), "step": saved.get("step"), "clean": saved["clean"]}

    def _write_manifest(self, clean: bool, epoch: int, step: int | None) -> None:
        """Replace store.json durably: temp file, fsync, rename, fsync the dir."""
        manifest = {
            "clean": clean,
            "step": step,
            "epoch": epoch,
            "dtype": "float32",
            "state_width": self.state_width,
            "tables": {t.name: {"rows": t.rows, "dim": t.dim} for t in self.tables},
        }
        tmp = self.path / ".store.json.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(manifest, indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / "store.json")
            _fsync_path(self.path)
        except OSError as e:
            raise OSError(
                e.errno, f"disk store {self.path}: cannot write store.json ({e.strerror}); the store "
                "still rolls back to its last flush"
            ) from e

    # ------------------------------------------------------------------ rows

    def read(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.spec[name]
        rows = self.packed[name].index_select(0, ids)
        w, s = rows[:, : t.dim], rows[:, t.dim :]
        fresh = (self.written[name].index_select(0, ids) == 0).nonzero().flatten()
        if len(fresh):
            w[fresh] = hash_init(self.index[name], ids[fresh], t.dim, t.rows)
        return w, s

    def write(self, name: str, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> None:
        self._journal(name, ids)  # raises before any row of this batch changes
        if s is not None:
            self.packed[name].index_copy_(0, ids, torch.cat([w, s], 1))
        else:
            self.weights[name][ids] = w
        self.written[name].index_fill_(0, ids, 1)

    def _journal(self, name: str, ids: torch.Tensor) -> None:
        """Append the old contents of the rows of `ids` not yet journaled since the last flush."""
        if not self._dirty:
            self.mark_dirty()
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
                self.packed[name].index_select(0, old).numpy().tobytes(),
                self.written[name].index_select(0, old).numpy().tobytes(),
            ])  # fmt: skip
            self._append(name, RECORD_HEADER.pack(RECORD_MAGIC, len(chunk), zlib.crc32(payload)) + payload)
            np.bitwise_or.at(bits, chunk >> 3, (1 << (chunk & 7)).astype(np.uint8))

    def _append(self, name: str, record: bytes) -> None:
        """Append `record` to the table's journal, or raise with the journal as it was before."""
        file = self.journal_file(name)
        try:
            if name not in self._journal_fd:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                t = self.spec[name]
                header = JOURNAL_HEADER.pack(JOURNAL_MAGIC, JOURNAL_VERSION, t.dim + self.state_width, self.epoch)
                try:
                    _write_all(fd, header, 0)
                    if self.durable:  # the new file's directory entry must survive too
                        _fsync_path(self.path)
                except OSError:
                    os.close(fd)  # the next append starts the file again
                    raise
                self._journal_fd[name], self._journal_end[name] = fd, len(header)
            fd = self._journal_fd[name]
            _write_all(fd, record, self._journal_end[name])
            if self.durable:
                os.fdatasync(fd)
        except OSError as e:
            if name in self._journal_fd:
                try:  # drop a partial record; the next append would overwrite it anyway
                    os.ftruncate(self._journal_fd[name], self._journal_end[name])
                except OSError:
                    pass
            raise OSError(
                e.errno, f"disk store {self.path}: cannot append to the undo journal {file.name} "
                f"({e.strerror}); no row of this batch was written, the store still rolls back to its last flush"
            ) from e
        self._journal_end[name] += len(record)

    def _drop_journals(self) -> None:
        for name in self.spec:
            fd = self._journal_fd.pop(name, None)
            if fd is not None:
                os.close(fd)
            self._journal_end.pop(name, None)
            self.journal_file(name).unlink(missing_ok=True)
            self._journaled[name] = np.zeros(self._journaled[name].shape, np.uint8)  # fresh zero pages, no sweep

    def _roll_back(self) -> None:
        """Undo every write since the last flush that a journal of this epoch recorded."""
        restored = {}
        for t in self.tables:
            file = self.journal_file(t.name)
            if not file.exists():
                continue
            width = t.dim + self.state_width
            records, torn = _read_journal(file, self.epoch, width)
            if torn:
                log.warning("%s: ignoring a torn last record of %d bytes (cut short by a crash)", file, torn)
            with open(file, "rb") as f:
                for offset, count in reversed(records):  # each id is in one record; reversed all the same
                    f.seek(offset)
                    payload = f.read(count * (8 + width * FP32_BYTES + 1))
                    ids = torch.from_numpy(np.frombuffer(payload, "<i8", count).copy())
                    rows = np.frombuffer(payload, "<f4", count * width, count * 8).reshape(count, width)
                    flags = np.frombuffer(payload, np.uint8, count, count * (8 + width * FP32_BYTES))
                    self.packed[t.name].index_copy_(0, ids, torch.from_numpy(rows.copy()))
                    self.written[t.name].index_copy_(0, ids, torch.from_numpy(flags.copy()))
            restored[t.name] = sum(c for _, c in records)
        restored = {n: c for n, c in restored.items() if c}
        if restored:
            log.warning(
                "emb.path=%s: the last run stopped after its last flush (step %s); rolled back rows %s",
                self.path, self.committed_step, restored,
            )
        if self._dirty or restored:
            self._dirty = True
            self.flush(self.committed_step)
        else:
            self._drop_journals()  # stale ones from an older epoch

    # ------------------------------------------------------------------ state

    def resident_bytes(self) -> int:
        # The files are page cache, reclaimable by the OS (see CachedEmbeddings docs); the
        # journaled-rows bitmap is ordinary memory.
        return sum(b.nbytes for b in self._journaled.values())

    def flush(self, step: int | None = None) -> None:
        """Commit the files as they are now: a later crash rolls back to this state.

        Order matters: data durable, then the manifest (new epoch), then the journals may go.
        A flush with nothing written since the last one keeps that one's step unless given one.
        """
        if not self._dirty and (step is None or step == self.committed_step):
            return
        for mm in self._maps:
            mm.flush()  # msync: dirty pages of the maps reach the files
        for t in self.tables:
            _fsync_path(self.rows_file(t.name))  # and their metadata (blocks of a sparse file)
            _fsync_path(self.init_file(t.name))
        self._write_manifest(clean=True, epoch=self.epoch + 1, step=step)
        self.epoch, self.committed_step, self._dirty = self.epoch + 1, step, False
        self._drop_journals()  # their epoch is over: a leftover one is ignored on resume

    def mark_dirty(self) -> None:
        if not self._dirty:
            self._write_manifest(clean=False, epoch=self.epoch, step=self.committed_step)
            self._dirty = True

    def describe(self) -> str:
        return f"disk {self.path}"


def read_disk_table(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(weights, state) of table `name` from a flushed disk store, fresh from its files.

    Rows never written read as their init (`hash_init`), as the store itself reads them.
    """
    path = Path(path)
    manifest = json.loads((path / "store.json").read_text())
    t = manifest["tables"][name]
    width = manifest["state_width"]
    if not manifest["clean"]:
        raise ValueError(f"{path}: store.json says the store was not flushed")
    journal = path / f"{name}.undo"
    if journal.exists() and _read_journal(journal, manifest.get("epoch", 0), t["dim"] + width)[0]:
        raise ValueError(
            f"{path}: {journal.name} holds writes after the last flush; reopen the store with resume"
        )
    packed = np.memmap(path / f"{name}.rows.f32", np.float32, "r", shape=(t["rows"], t["dim"] + width))
    w, s = np.array(packed[:, : t["dim"]]), packed[:, t["dim"] :]
    written = np.memmap(path / f"{name}.init.u8", np.uint8, "r", shape=(t["rows"],))
    fresh = np.flatnonzero(written == 0)
    index = list(manifest["tables"]).index(name)
    w[fresh] = hash_init(index, torch.from_numpy(fresh), t["dim"], t["rows"]).numpy()
    return w, s

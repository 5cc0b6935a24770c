"""The disk store behind `emb=cached emb.store=disk`: full tables (weights + optimizer state) in
memory-mapped files, for tables larger than RAM (the Store protocol: store.py).

Per table `weights [rows, dim]` and `state [rows, width]` (fp32; width 1 for row-wise Adagrad,
dim for Adagrad, 0 for SGD) are CPU tensors viewing `numpy.memmap`s, so only the pages touched
stay resident.

Disk layout under `emb.path`: `<table>.rows.f32`, raw little-endian fp32 `[rows, dim + width]`,
each row's weights followed by its optimizer state (one page touched per row moved, not two),
`<table>.init.u8` (1 once a row was written), `<table>.undo` (the undo journal, below) and
`store.json`. The files are never swept: their blocks are reserved with `posix_fallocate` (they
read as zeros, and reserving 13.6 GB took 0.03 s on ext4), and a row that was never written reads
as its init, U(-1/sqrt(rows), 1/sqrt(rows)) from a counter-based hash of (table, id, column,
training seed; `hash_init`, the seed kept in store.json as init_seed), so building a 200M-row
store writes no rows and only touched pages are read. Those values are not torch's RNG stream
(tables.py's `init_uniform_`), only the same distribution; `load_weights` replaces them.

Crash safety. Rows are written in place (evictions) between flushes, so the files alone would
mix the last flushed state with later write-backs after a crash. Before a row (or its init byte)
changes for the first time since the last flush, its old contents are appended to
`<table>.undo` (journal.py), and only then is the row written through the map. `flush(step)` syncs the maps and files, then commits `store.json` (temp file, fsync,
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
import tempfile
from pathlib import Path

import numpy as np
import torch

from dlrm.embeddings.base import FP32_BYTES, TableSpec
from dlrm.embeddings.cached.journal import UndoJournal, read_journal
from dlrm.io import fsync_path

log = logging.getLogger(__name__)


def hash_init(table_index: int, ids: torch.Tensor, dim: int, rows: int, seed: int = 0) -> torch.Tensor:
    """Deterministic U(-1/sqrt(rows), 1/sqrt(rows)) rows for `ids` ([n] -> [n, dim] fp32):
    splitmix64 of the element index, offset per table and per `seed` (the training seed)."""
    offset = ((table_index + 1) * 0x9E3779B97F4A7C15 + seed * 0xD1B54A32D192ED03) % 2**64
    offset = offset - 2**64 if offset >= 2**63 else offset  # as int64
    x = ids.to(torch.int64).unsqueeze(1) * dim + torch.arange(dim) + offset
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64 (wraps, as intended)
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * -7723592293110705685  # 0x94D049BB133111EB as int64
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    unit = ((x >> 11) & ((1 << 24) - 1)).to(torch.float64) / (1 << 24)  # [0, 1)
    bound = 1.0 / math.sqrt(rows)
    return ((2 * unit - 1) * bound).to(torch.float32)


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
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.seed = seed  # of the lazy init; a reopened store keeps the one it was made with
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
        manifest = self.path / "store.json"
        if resume:
            if not manifest.exists():
                raise ValueError(f"emb.path={str(self.path)!r} holds no table store (store.json) to resume from")
            saved = self._check_manifest(json.loads(manifest.read_text()))
            self.epoch, self.committed_step, self.seed = saved["epoch"], saved["step"], saved["seed"]
            self.journal = UndoJournal(self.path, tables, state_width, self.epoch, durable)
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
            self.journal = UndoJournal(self.path, tables, state_width, self.epoch, durable)
            self.journal.drop()  # a journal without a store.json protects nothing
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
        # stores written before "init_seed" existed were initialized with seed 0
        return {"epoch": saved.get("epoch", 0), "step": saved.get("step"), "clean": saved["clean"],
                "seed": saved.get("init_seed", 0)}

    def _write_manifest(self, clean: bool, epoch: int, step: int | None) -> None:
        """Replace store.json durably: temp file, fsync, rename, fsync the dir."""
        manifest = {
            "clean": clean,
            "step": step,
            "epoch": epoch,
            "init_seed": self.seed,
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
            fsync_path(self.path)
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
            w[fresh] = hash_init(self.index[name], ids[fresh], t.dim, t.rows, self.seed)
        return w, s

    def write(self, name: str, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> None:
        self._journal(name, ids)  # raises before any row of this batch changes
        if s is not None:
            self.packed[name].index_copy_(0, ids, torch.cat([w, s], 1))
        else:
            self.weights[name][ids] = w
        self.written[name].index_fill_(0, ids, 1)

    def _journal(self, name: str, ids: torch.Tensor) -> None:
        if not self._dirty:
            self.mark_dirty()
        self.journal.protect(name, ids, self.packed[name], self.written[name])

    def _roll_back(self) -> None:
        """Undo every write since the last flush that a journal of this epoch recorded."""
        restored = {}
        for t in self.tables:
            restored[t.name], torn = self.journal.replay(t.name, self.packed[t.name], self.written[t.name])
            if torn:
                log.warning("%s: ignoring a torn last record of %d bytes (cut short by a crash)",
                            self.journal.file(t.name), torn)
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
            self.journal.drop()  # stale ones from an older epoch

    # ------------------------------------------------------------------ state

    def resident_bytes(self) -> int:
        # The files are page cache, reclaimable by the OS (see CachedEmbeddings docs); the
        # journaled-rows bitmap is ordinary memory.
        return self.journal.bytes()

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
            fsync_path(self.rows_file(t.name))  # and their metadata (blocks of a sparse file)
            fsync_path(self.init_file(t.name))
        self._write_manifest(clean=True, epoch=self.epoch + 1, step=step)
        self.epoch, self.committed_step, self._dirty = self.epoch + 1, step, False
        self.journal.epoch = self.epoch
        self.journal.drop()  # their epoch is over: a leftover one is ignored on resume

    def mark_dirty(self) -> None:
        if not self._dirty:
            self._write_manifest(clean=False, epoch=self.epoch, step=self.committed_step)
            self._dirty = True

    def checkpoint_state(self) -> None:
        return None  # the tables stay in their files, committed by `flush(step)`

    def load_checkpoint_state(self, saved: None) -> None:
        pass

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
    if journal.exists() and read_journal(journal, manifest.get("epoch", 0), t["dim"] + width)[0]:
        raise ValueError(
            f"{path}: {journal.name} holds writes after the last flush; reopen the store with resume"
        )
    packed = np.memmap(path / f"{name}.rows.f32", np.float32, "r", shape=(t["rows"], t["dim"] + width))
    w, s = np.array(packed[:, : t["dim"]]), packed[:, t["dim"] :]
    written = np.memmap(path / f"{name}.init.u8", np.uint8, "r", shape=(t["rows"],))
    fresh = np.flatnonzero(written == 0)
    index = list(manifest["tables"]).index(name)
    seed = manifest.get("init_seed", 0)  # stores from before init_seed: 0
    w[fresh] = hash_init(index, torch.from_numpy(fresh), t["dim"], t["rows"], seed).numpy()
    return w, s

"""Cold stores behind `emb=cached`: the full table (weights + optimizer state) in host memory or
in memory-mapped files on disk.

A store holds, per table, `weights [rows, dim]` and `state [rows, width]` (fp32; width 1 for
row-wise Adagrad, dim for Adagrad, 0 for SGD). Both stores expose them as CPU tensors, so the
cache reads and writes rows with the same `index_select` / indexed assignment; for the disk store
those tensors are views of `numpy.memmap`s, so only the pages touched stay resident.

Disk layout under `emb.path`: `<table>.rows.f32`, raw little-endian fp32 `[rows, dim + width]`,
each row's weights followed by its optimizer state (one page touched per row moved, not two),
`<table>.init.u8` (1 once a row was written) and `store.json`, rewritten by temp file
+ rename. The files start sparse and are never swept: a row that was never written reads as its
init, U(-1/sqrt(rows), 1/sqrt(rows)) from a counter-based hash of (table, id, column) (`hash_init`),
so building a 200M-row store costs nothing and only touched pages reach the disk. Those values
are not torch's RNG stream (full.py's), only the same distribution; `load_weights` replaces them. `store.json` says `"clean": true`
only after `flush()` wrote every cached row back and synced the maps; a store whose manifest says
`"clean": false` was left by a run that did not finish flushing.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from dlrm.embeddings.base import FP32_BYTES, TableSpec

INIT_CHUNK_ROWS = 1 << 20  # rows initialized per chunk: bounds the init's resident memory


def init_uniform_(t: torch.Tensor, rows: int) -> None:
    """U(-1/sqrt(rows), 1/sqrt(rows)) in place, chunk by chunk: full.py's init for a table."""
    bound = 1.0 / math.sqrt(rows)
    for start in range(0, t.shape[0], INIT_CHUNK_ROWS):
        t[start : start + INIT_CHUNK_ROWS].uniform_(-bound, bound)


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

    def flush(self) -> None:
        pass

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


class DiskStore:
    """Full tables plus optimizer state in memory-mapped files under `path`."""

    kind = "disk"

    def __init__(
        self, tables: list[TableSpec], state_width: int, path: Path, random_access: bool = True
    ) -> None:
        self.path = Path(path)
        self.random_access = random_access
        need = sum(t.rows * (t.dim + state_width) * FP32_BYTES for t in tables)
        check_writable(self.path, need)
        self.tables = tables
        self.state_width = state_width
        self._maps: list[np.memmap] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.written: dict[str, torch.Tensor] = {}
        self.packed: dict[str, torch.Tensor] = {}
        self.index = {t.name: i for i, t in enumerate(tables)}
        self.spec = {t.name: t for t in tables}
        self._write_manifest(clean=False)
        for t in tables:
            # mode w+ creates zero-filled sparse files: Adagrad state starts at 0, no row written.
            self.packed[t.name] = self._open(self.rows_file(t.name), (t.rows, t.dim + state_width))
            self.weights[t.name] = self.packed[t.name][:, : t.dim]
            self.state[t.name] = self.packed[t.name][:, t.dim :]
            self.written[t.name] = self._open(self.init_file(t.name), (t.rows,), np.uint8)

    def read(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.spec[name]
        rows = self.packed[name].index_select(0, ids)
        w, s = rows[:, : t.dim], rows[:, t.dim :]
        fresh = (self.written[name].index_select(0, ids) == 0).nonzero().flatten()
        if len(fresh):
            w[fresh] = hash_init(self.index[name], ids[fresh], t.dim, t.rows)
        return w, s

    def write(self, name: str, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> None:
        if s is not None:
            self.packed[name].index_copy_(0, ids, torch.cat([w, s], 1))
        else:
            self.weights[name][ids] = w
        self.written[name].index_fill_(0, ids, 1)

    def init_file(self, name: str) -> Path:
        return self.path / f"{name}.init.u8"

    def rows_file(self, name: str) -> Path:
        return self.path / f"{name}.rows.f32"

    def _open(self, file: Path, shape: tuple[int, ...], dtype=np.float32) -> torch.Tensor:
        mm = np.memmap(file, dtype=dtype, mode="w+", shape=shape)
        # Rows are read and written at random: without MADV_RANDOM each page fault maps ~16
        # pages around it (fault-around / readahead): 6.1 GB of file pages instead of 0.8 GB on
        # the 200M-row benchmark, but ~1.3-1.5x faster steps while the file fits in RAM.
        if self.random_access and hasattr(mmap, "MADV_RANDOM") and getattr(mm, "_mmap", None) is not None:
            mm._mmap.madvise(mmap.MADV_RANDOM)
        self._maps.append(mm)
        return torch.from_numpy(mm)

    def _write_manifest(self, clean: bool) -> None:
        manifest = {
            "clean": clean,
            "dtype": "float32",
            "state_width": self.state_width,
            "tables": {t.name: {"rows": t.rows, "dim": t.dim} for t in self.tables},
        }
        tmp = self.path / ".store.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.path / "store.json")

    def resident_bytes(self) -> int:
        return 0  # the files are page cache, reclaimable by the OS; see CachedEmbeddings docs

    def flush(self) -> None:
        for mm in self._maps:
            mm.flush()
        self._write_manifest(clean=True)

    def mark_dirty(self) -> None:
        self._write_manifest(clean=False)

    def describe(self) -> str:
        return f"disk {self.path}"


def read_disk_table(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(weights, state) of table `name` from a flushed disk store, fresh from its files.

    Rows never written read as their init (`hash_init`), as the store itself reads them.
    """
    path = Path(path)
    manifest = json.loads((path / "store.json").read_text())
    if not manifest["clean"]:
        raise ValueError(f"{path}: store.json says the store was not flushed")
    t = manifest["tables"][name]
    width = manifest["state_width"]
    packed = np.memmap(path / f"{name}.rows.f32", np.float32, "r", shape=(t["rows"], t["dim"] + width))
    w, s = np.array(packed[:, : t["dim"]]), packed[:, t["dim"] :]
    written = np.memmap(path / f"{name}.init.u8", np.uint8, "r", shape=(t["rows"],))
    fresh = np.flatnonzero(written == 0)
    index = list(manifest["tables"]).index(name)
    w[fresh] = hash_init(index, torch.from_numpy(fresh), t["dim"], t["rows"]).numpy()
    return w, s

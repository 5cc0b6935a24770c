"""Cold stores behind `emb=cached`: the full table (weights + optimizer state) in host memory or
in memory-mapped files on disk.

A store holds, per table, `weights [rows, dim]` and `state [rows, width]` (fp32; width 1 for
row-wise Adagrad, dim for Adagrad, 0 for SGD). Both stores expose them as CPU tensors, so the
cache reads and writes rows with the same `index_select` / indexed assignment; for the disk store
those tensors are views of `numpy.memmap`s, so only the pages touched stay resident.

Disk layout under `emb.path`: `<table>.weights.f32`, `<table>.state.f32` (raw little-endian fp32,
row-major) and `store.json`, rewritten by temp file + rename. `store.json` says `"clean": true`
only after `flush()` wrote every cached row back and synced the maps; a store whose manifest says
`"clean": false` was left by a run that did not finish flushing.
"""

from __future__ import annotations

import json
import math
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

    def __init__(self, tables: list[TableSpec], state_width: int, path: Path) -> None:
        self.path = Path(path)
        need = sum(t.rows * (t.dim + state_width) * FP32_BYTES for t in tables)
        check_writable(self.path, need)
        self.tables = tables
        self.state_width = state_width
        self._maps: list[np.memmap] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self._write_manifest(clean=False)
        for t in tables:
            w = self._open(self.weights_file(t.name), (t.rows, t.dim))
            init_uniform_(w, t.rows)
            self.weights[t.name] = w
            s = self._open(self.state_file(t.name), (t.rows, max(state_width, 1)))
            # mode w+ creates a zero-filled (sparse) file: Adagrad state starts at 0.
            self.state[t.name] = s[:, :state_width]

    def weights_file(self, name: str) -> Path:
        return self.path / f"{name}.weights.f32"

    def state_file(self, name: str) -> Path:
        return self.path / f"{name}.state.f32"

    def _open(self, file: Path, shape: tuple[int, int]) -> torch.Tensor:
        mm = np.memmap(file, dtype=np.float32, mode="w+", shape=shape)
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
    """(weights, state) of table `name` from a flushed disk store, read-only memmaps."""
    path = Path(path)
    manifest = json.loads((path / "store.json").read_text())
    if not manifest["clean"]:
        raise ValueError(f"{path}: store.json says the store was not flushed")
    t = manifest["tables"][name]
    width = manifest["state_width"]
    w = np.memmap(path / f"{name}.weights.f32", np.float32, "r", shape=(t["rows"], t["dim"]))
    s = np.memmap(path / f"{name}.state.f32", np.float32, "r", shape=(t["rows"], max(width, 1)))
    return w, s[:, :width]

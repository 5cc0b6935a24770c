"""Our C kernels (dlrm/kernels/*.c): built on first use with the system C compiler, loaded with ctypes.

Each source is compiled with `$CC` (default `cc`) and `-O3 -march=native -fopenmp` into
`~/.cache/dlrm/kernels` (`$XDG_CACHE_HOME` respected), keyed by the source, the flags and the CPU's
flags (the KEEP_BUILDS most recently used builds of each source kept), and loaded with ctypes: no
Python or torch headers, under a second to build. `-fopenmp` binds the kernels to the libgomp
torch already loaded (same soname), so their parallel loops run on torch's own OpenMP workers
(docs/benchmarks.md, "TT's C kernels": pthreads fought torch's spinning worker). Users:
tt_native.py (TT's chain products), table_native.py (batched tables), dot_interaction.py (the dot
interaction), linear_relu.py (the MLPs' ReLU backward).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from dlrm.options import ConfigError

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent  # the kernels' C sources sit beside this file
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu99", "-fopenmp"]

KEEP_BUILDS = 4  # builds kept per source: one per recent version of it (other checkouts, branches)

# ctypes shorthands for the signature tables of the kernels' users
P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class NativeKernelError(RuntimeError):
    """A C kernel could not be built or loaded (the message says why: no compiler, its error)."""


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them), for the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dlrm" / "kernels"


def load(source: Path, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL:
    """`source` compiled (once per source/flags/CPU, then loaded from the cache), with each entry
    of `signatures` (`name: (argument types, return type)`, as declared in the source) set on it.
    Callers cache the result (`functools.cache`).

    Raises NativeKernelError: no C compiler, it failed (its first error line), or the cache dir
    cannot be written."""
    cc = os.environ.get("CC", "cc")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join([cc, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():
        if shutil.which(cc) is None:
            raise NativeKernelError(f"no C compiler ({cc!r} not on PATH; set $CC) to build {source.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # build beside the target, then rename: a concurrent job never loads a half-written file
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                done = subprocess.run(
                    [cc, *FLAGS, str(source), "-o", str(out)], capture_output=True, text=True, check=False
                )
                if done.returncode != 0:
                    first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
                    raise NativeKernelError(f"{cc} failed to build {source.name}: {first}")
                os.replace(out, path)
        except OSError as e:  # an unwritable cache dir, or the compiler could not be started
            raise NativeKernelError(f"cannot build {source.name} into {path.parent}: {e}") from e
        _prune(source.stem, path.parent)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # e.g. another version's build pruned it a moment ago: it rebuilds next time
        raise NativeKernelError(f"cannot load {path}: {e}") from e
    try:
        os.utime(path)  # a loaded build is a recent one: `_prune` keeps the most recently used
    except OSError:  # a read-only cache: nothing to prune there either
        pass
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def _prune(stem: str, cache: Path) -> None:
    """Delete all but the KEEP_BUILDS most recently built or loaded builds of `stem` (every edit of
    a source, every upgrade, is a new key: without this the cache grew by a build each time). A
    process that has a deleted build loaded keeps it (unlinked files stay mapped); one that wants
    it rebuilds it (under a second)."""
    builds = []
    for p in cache.glob(f"{stem}-*.so"):
        try:
            builds.append((p.stat().st_mtime, p))
        except OSError:  # deleted meanwhile by another process's prune
            continue
    for _, old in sorted(builds, reverse=True)[KEEP_BUILDS:]:
        old.unlink(missing_ok=True)


def loads(library: Callable[[], ctypes.CDLL], key: str, kernel: str, fallback: str) -> bool:
    """Whether the C kernel `library` (a cached loader) builds and loads, for the setting `key`
    (`emb.kernel`, `optim.sparse.kernel`, `model.kernel`) set to `kernel`: `native` requires it,
    `auto` falls back to PyTorch ops, warning once; `fallback` says what then runs them.

    Raises ConfigError (one line naming `key`) when `native` cannot build or load."""
    try:
        library()
    except NativeKernelError as e:
        if kernel == "native":
            raise ConfigError(f"{key}=native: {e}; {key}=torch (or auto) runs PyTorch ops") from e
        _warn_once(f"{key}=auto: {fallback} PyTorch ops (slower on CPU): {e}")
        return False
    return True


@cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for ctypes (None for NULL)."""
    return None if t is None else t.data_ptr()

"""Files that are never half-written: write to a temporary name beside the target, then rename.

A rename within one directory is atomic on POSIX, so a reader (or a crashed run's successor) sees
either the old file or the whole new one, never a prefix that looks valid.

Example::

    with atomic_path(out / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta))          # out/meta.json appears only now, whole

    atomic_write_text(out / "results.json", text, durable=True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory: so a rename inside it survives an OS
    crash, not only a killed process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str, durable: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error remove it.

    `suffix` is appended to the temporary name for writers that insist on an extension
    (`np.save` adds `.npy` unless the name ends in it). With `durable`, the file is fsynced before
    the rename and its directory after it, so the rename survives power loss too.
    Works for files and for directories (a directory is renamed whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        yield tmp
        if durable and tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str, durable: bool = False) -> Path:
    """Write `text` to `path` through `atomic_path`; returns `path`."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: Path | str, data: bytes, durable: bool = False) -> Path:
    """Write `data` to `path` through `atomic_path`; returns `path`."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)

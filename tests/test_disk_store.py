"""emb.store=disk crash safety: the undo journal rolls a killed run back to its last flush (for
real: the writer is SIGKILLed), a torn journal tail is ignored, a failing journal write leaves
the rows untouched, a store is reopened only with resume, and only if it matches the tables."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dlrm.embeddings import Runtime, TableSpec
from dlrm.embeddings.cached import journal as cache_store
from dlrm.embeddings.cached.disk import DiskStore, read_disk_table
from dlrm.embeddings.cached.journal import JOURNAL_HEADER, RECORD_HEADER
from dlrm.embeddings.cached import CachedEmbeddings

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ADAGRAD = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
TABLES = [TableSpec("t_a", rows=2000, dim=4, features=("a",)), TableSpec("t_b", rows=1000, dim=4, features=("b",))]
WIDTH = 1  # row-wise Adagrad: one state float per row

# Shared by the crashing subprocesses: the same tables, and random writes of n rows of a table.
PRELUDE = """
import os, shutil, signal, sys
from pathlib import Path
import torch
from dlrm.embeddings import TableSpec
from dlrm.embeddings.cached import journal as cache_store
from dlrm.embeddings.cached.disk import DiskStore
TABLES = [TableSpec("t_a", rows=2000, dim=4, features=("a",)), TableSpec("t_b", rows=1000, dim=4, features=("b",))]
store, saved = Path(sys.argv[1]), Path(sys.argv[2])
g = torch.Generator().manual_seed(0)

def write(s, name, n):
    rows = s.spec[name].rows
    ids = torch.randperm(rows, generator=g)[:n]
    s.write(name, ids, torch.randn(n, 4, generator=g), torch.rand(n, 1, generator=g))

def save_state():  # state A: copies of the files as the flush left them
    saved.mkdir()
    for f in store.glob("*.*.*"):
        shutil.copyfile(f, saved / f.name)

def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_and_die(tmp_path: Path, body: str) -> tuple[Path, Path]:
    """Run PRELUDE + body in a fresh interpreter, which must end by SIGKILLing itself."""
    script = tmp_path / "crash.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    store, saved = tmp_path / "store", tmp_path / "saved"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(store), str(saved)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return store, saved


def files(path: Path) -> dict[str, bytes]:
    """The rows and init files under `path`, byte for byte."""
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.rows.f32")) + sorted(path.glob("*.init.u8"))}


def write(store: DiskStore, name: str, ids: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    store.write(name, ids, torch.randn(len(ids), 4, generator=g), torch.rand(len(ids), WIDTH, generator=g))


def test_a_killed_training_run_rolls_back_to_its_last_flush(tmp_path):
    # Training with a 50-row cache: every step evicts rows into the files; killed 10 steps
    # after its flush at step 10.
    store, saved = run_and_die(tmp_path, """
        from omegaconf import OmegaConf
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        from dlrm.embeddings.cached import CachedEmbeddings
        cfg = OmegaConf.create({"name": "cached", "dim": 4, "pooling": "sum", "store": "disk", "path": str(store),
                                "cache_rows": 50, "warm_start": "none", "policy": "lfu"})
        optim = OmegaConf.create({"name": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
        emb = CachedEmbeddings(TABLES, cfg, optim, torch.device("cpu"))

        def step():
            ids = torch.cat([torch.randint(t.rows, (40,), generator=g) for t in TABLES])
            kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], ids, torch.ones(80, dtype=torch.long))
            emb(kjt).values().sum().backward()

        for _ in range(10):
            step()
        emb.flush(step=10)
        save_state()
        for _ in range(10):
            step()
        assert emb.stats()["cache_evictions_per_step"] > 10
        die()
    """)
    assert {f.name for f in store.glob("*.undo")} == {"t_a.undo", "t_b.undo"}
    assert files(store) != files(saved)  # the killed run did change rows in place
    assert json.loads((store / "store.json").read_text())["clean"] is False

    reopened = DiskStore(TABLES, WIDTH, store, resume=True)
    assert files(store) == files(saved)
    assert reopened.committed_step == 10
    assert not list(store.glob("*.undo")) and json.loads((store / "store.json").read_text())["clean"] is True
    read_disk_table(store, "t_a")  # a clean store again


@pytest.mark.parametrize("torn", ["journal header", "record header", "record payload"])
def test_a_crash_mid_append_leaves_a_torn_tail_that_is_ignored(tmp_path, torn):
    # The journal write of the last batch is cut short and the process dies before that batch's
    # rows change (the append comes first); an earlier batch was journaled and written in place.
    cut = {"journal header": 10, "record header": 5, "record payload": RECORD_HEADER.size + 30}[torn]
    store, saved = run_and_die(tmp_path, f"""
        s = DiskStore(TABLES, 1, store)
        write(s, "t_a", 300)
        s.flush(step=3)
        save_state()

        def torn_write(fd, data, offset):
            os.pwrite(fd, bytes(data)[:{cut}], offset)
            die()

        if {torn!r} == "journal header":  # the first write after a flush creates the journal
            cache_store._write_all = torn_write
        write(s, "t_a", 200)
        cache_store._write_all = torn_write
        write(s, "t_a", 200)
    """)
    journal = store / "t_a.undo"
    if torn == "journal header":
        assert journal.stat().st_size == cut and files(store) == files(saved)
    else:
        record = RECORD_HEADER.size + 200 * (8 + 5 * 4 + 1)
        assert journal.stat().st_size == JOURNAL_HEADER.size + record + cut
        assert files(store) != files(saved)

    reopened = DiskStore(TABLES, WIDTH, store, resume=True)
    assert files(store) == files(saved) and reopened.committed_step == 3
    assert not journal.exists()


def test_reopening_a_flushed_store_gives_its_rows_and_step(tmp_path):
    cfg = OmegaConf.create({"name": "cached", "dim": 4, "pooling": "sum", "store": "disk", "path": str(tmp_path),
                            "cache_rows": 50, "warm_start": "ids"})  # fmt: skip
    emb = CachedEmbeddings(TABLES, cfg, ADAGRAD, CPU)
    for name, rows in [("t_a", 2000), ("t_b", 1000)]:
        emb.load_weights(name, torch.randn(rows, 4))
    emb.flush(step=7)
    before = {t.name: emb.cold_rows(t.name) for t in TABLES}
    assert emb.store.committed_step == 7  # cold_rows' flush changed nothing, so the step stays
    del emb

    again = CachedEmbeddings(TABLES, cfg, ADAGRAD, CPU, Runtime(resuming=True))  # a resuming run
    assert again.store.committed_step == 7
    for t in TABLES:
        w, s = again.cold_rows(t.name)
        torch.testing.assert_close(w, before[t.name][0], rtol=0, atol=0)
        torch.testing.assert_close(s, before[t.name][1], rtol=0, atol=0)
    again.flush(step=None)
    assert json.loads((tmp_path / "store.json").read_text())["step"] == 7
    write(again.store, "t_a", torch.arange(5), seed=1)
    again.store.flush()  # a flush of new writes without a step: the state is no checkpoint's
    assert again.store.committed_step is None
    assert DiskStore(TABLES, WIDTH, tmp_path, resume=True).committed_step is None


def test_a_store_is_reused_only_when_resuming_and_only_if_it_matches(tmp_path):
    store = DiskStore(TABLES, WIDTH, tmp_path)
    write(store, "t_a", torch.arange(10), seed=0)
    store.flush(step=1)
    kept = files(tmp_path)
    with pytest.raises(ValueError, match=r"^emb.path='.*' already holds a table store \(store.json\); remove it, "
                                         r"choose another emb.path, or resume$"):  # fmt: skip
        DiskStore(TABLES, WIDTH, tmp_path)
    bigger = [TableSpec("t_a", 3000, 4, ("a",)), TABLES[1]]
    with pytest.raises(ValueError, match=r"table t_a is 2000 rows x 4 in store.json, 3000 x 4 in this run"):
        DiskStore(bigger, WIDTH, tmp_path, resume=True)
    wider = [TableSpec("t_a", 2000, 8, ("a",)), TABLES[1]]
    with pytest.raises(ValueError, match=r"table t_a is 2000 rows x 4 in store.json, 2000 x 8 in this run"):
        DiskStore(wider, WIDTH, tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"store.json holds tables \['t_a', 't_b'\], this run has \['t_a'\]"):
        DiskStore(TABLES[:1], WIDTH, tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"store.json holds 1 optimizer state floats per row, .* needs 4"):
        DiskStore(TABLES, 4, tmp_path, resume=True)
    assert files(tmp_path) == kept  # nothing was truncated or rewritten
    (tmp_path / "t_b.init.u8").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"t_b.init.u8 has 10 bytes, store.json implies 1000"):
        DiskStore(TABLES, WIDTH, tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"emb.path='.*elsewhere' holds no table store \(store.json\) to resume"):
        DiskStore(TABLES, WIDTH, tmp_path / "elsewhere", resume=True)


def test_a_full_disk_fails_when_the_store_is_made_not_at_a_write(tmp_path, monkeypatch):
    store = DiskStore(TABLES, WIDTH, tmp_path / "ok")
    for t in TABLES:  # blocks reserved: a write through the map never meets a full disk
        f = store.rows_file(t.name)
        assert f.stat().st_blocks * 512 >= f.stat().st_size

    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_store.os, "posix_fallocate", disk_full)
    with pytest.raises(OSError, match=r"^\[Errno 28\] disk store .*full: cannot reserve .* GiB for t_a.rows.f32 "
                                      r"\(No space left on device\)"):  # fmt: skip
        DiskStore(TABLES, WIDTH, tmp_path / "full")


def test_a_failing_journal_write_changes_no_row(tmp_path, monkeypatch):
    store = DiskStore(TABLES, WIDTH, tmp_path)
    write(store, "t_a", torch.arange(0, 400), seed=0)
    store.flush(step=1)
    state_a = files(tmp_path)
    write(store, "t_a", torch.arange(100, 200), seed=1)  # journaled and written
    before, journal_size = files(tmp_path), (tmp_path / "t_a.undo").stat().st_size
    calls, pwrite = [], os.pwrite

    def disk_full(fd, data, offset):  # the first write gets half of its bytes out, then ENOSPC
        calls.append(len(data))
        if len(calls) == 1:
            return pwrite(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_store.os, "pwrite", disk_full)
    with pytest.raises(OSError, match=r"^\[Errno 28\] disk store .*: cannot append to the undo journal t_a.undo "
                                      r"\(No space left on device\); no row of this batch was written"):  # fmt: skip
        write(store, "t_a", torch.arange(150, 450), seed=2)
    assert calls == [calls[0], calls[0] - calls[0] // 2]  # half of the record reached the file
    assert files(tmp_path) == before and (tmp_path / "t_a.undo").stat().st_size == journal_size

    monkeypatch.undo()  # space again: the same write goes through, journaled
    write(store, "t_a", torch.arange(150, 450), seed=2)
    assert files(tmp_path) != before
    DiskStore(TABLES, WIDTH, tmp_path, resume=True)  # the first store dies unflushed
    assert files(tmp_path) == state_a


@pytest.mark.parametrize("durable", [False, True])
def test_a_journal_left_from_before_the_last_flush_is_not_replayed(tmp_path, durable, monkeypatch):
    # Crash after the manifest's commit but before the journal's deletion reached the disk.
    monkeypatch.setattr(cache_store, "JOURNAL_CHUNK_ROWS", 128)  # several records per write
    store = DiskStore(TABLES, WIDTH, tmp_path, durable=durable)
    store.flush(step=1)
    write(store, "t_b", torch.arange(0, 500), seed=0)
    shutil.copyfile(tmp_path / "t_b.undo", tmp_path / "old.undo")
    store.flush(step=2)
    state = files(tmp_path)
    os.replace(tmp_path / "old.undo", tmp_path / "t_b.undo")
    reopened = DiskStore(TABLES, WIDTH, tmp_path, resume=True, durable=durable)
    assert files(tmp_path) == state and reopened.committed_step == 2
    assert not (tmp_path / "t_b.undo").exists()
    # And a journal of the current epoch is replayed: the unflushed writes are undone.
    write(reopened, "t_b", torch.arange(200, 700), seed=1)
    write(reopened, "t_a", torch.arange(0, 2000), seed=2)
    record = RECORD_HEADER.size + 128 * (8 + 5 * 4 + 1)
    assert (tmp_path / "t_a.undo").stat().st_size > JOURNAL_HEADER.size + 15 * record  # 16 records
    assert files(tmp_path) != state
    manifest = json.loads((tmp_path / "store.json").read_text())
    (tmp_path / "store.json").write_text(json.dumps({**manifest, "clean": True}))  # as if mark_dirty were lost
    with pytest.raises(ValueError, match=r"t_a.undo holds writes after the last flush; reopen the store with resume"):
        read_disk_table(tmp_path, "t_a")
    DiskStore(TABLES, WIDTH, tmp_path, resume=True)
    assert files(tmp_path) == state

"""Checkpoints: a run stopped and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch

from dlrm.checkpoint import CHECKPOINT_DIR, checkpoint_files
from dlrm.train import run

# Each backend with settings that make it do real work on the tiny dataset (tables <= 2,000 rows).
BACKENDS = {
    "full": [],
    "hashed": ["emb=hashed", "emb.min_rows=500", "compression=4"],
    "qr": ["emb=qr", "emb.min_rows=500", "compression=4"],
    "tt": ["emb=tt", "emb.min_rows=500", "rank=4"],
    "fp16": ["emb=fp16"],
    "hybrid": ["emb=hybrid", "emb.min_rows=500", "compression=4"],
    "mde": ["emb=mde", "emb.min_rows=500"],
    # a 20% cache of 2,000-row tables: rows are evicted (by score) and written back every step
    "cached_host": ["emb=cached", "emb.min_rows=500", "emb.cache_rows=400"],
    "cached_disk": ["emb=cached", "emb.store=disk", "emb.min_rows=500", "emb.cache_rows=400"],
    "cached_tt": ["emb=cached", "emb.store=tt", "emb.min_rows=500", "emb.cache_rows=400", "rank=4"],
}


def _metrics(results: dict) -> tuple[float, float]:
    return results["auc"], results["logloss"]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_resumed_run_equals_uninterrupted_run(backend, compose_cfg, tiny_dataset, tmp_path):
    extra = BACKENDS[backend]
    straight = run(compose_cfg(*extra, "trainer.max_steps=16"), tmp_path / "straight")
    first = compose_cfg(*extra, "trainer.max_steps=8", "trainer.checkpoint_every=5")
    run(first, tmp_path / "first")
    assert sorted(checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)) == [5, 8]  # + the final
    resumed = run(
        compose_cfg(*extra, "trainer.max_steps=16", f"trainer.resume={tmp_path / 'first'}"),
        tmp_path / "resumed",
    )
    assert resumed["steps"] == 16 and resumed["resumed_from_step"] == 8 and "resumed_from_step" not in straight
    assert _metrics(resumed) == pytest.approx(_metrics(straight), abs=1e-6)
    # Host caching is exact whatever it holds, so the cache's own state shows in its stats only.
    stats = sorted(k for k in straight if k.startswith("cache_"))
    assert [resumed[k] for k in stats] == pytest.approx([straight[k] for k in stats])


def test_resume_across_an_epoch_boundary_and_from_a_file(compose_cfg, tiny_dataset, tmp_path):
    # 30,000 rows in batches of 2048: 15 batches per epoch; the checkpoint at 20 is mid-epoch 2.
    big = ["trainer.batch_size=2048"]
    straight = run(compose_cfg(*big, "trainer.max_steps=24"), tmp_path / "straight")
    run(compose_cfg(*big, "trainer.max_steps=22", "trainer.checkpoint_every=10"), tmp_path / "first")
    files = checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)
    assert sorted(files) == [20, 22]  # only the newest two are kept
    state = torch.load(files[20], weights_only=False)
    assert (state["epoch"], state["epoch_batches"]) == (1, 5)
    resumed = run(
        compose_cfg(*big, "trainer.max_steps=24", f"trainer.resume={files[20]}"), tmp_path / "resumed"
    )
    assert _metrics(resumed) == pytest.approx(_metrics(straight), abs=1e-6)


def test_resume_refuses_other_settings_and_missing_checkpoints(compose_cfg, tiny_dataset, tmp_path, monkeypatch):
    run(compose_cfg("trainer.max_steps=3", "trainer.checkpoint_every=3"), tmp_path / "first")
    import dlrm.train

    def not_built(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint's settings were checked")

    monkeypatch.setattr(dlrm.train, "build_model", not_built)
    # names the setting and both values, not only its group
    with pytest.raises(ValueError, match=r"other settings: model.top_mlp=\[[0-9, ]+\] in the checkpoint, \[32, 1\] now; resume"):
        run(
            compose_cfg("trainer.max_steps=6", "model.top_mlp=[32,1]", f"trainer.resume={tmp_path / 'first'}"),
            tmp_path / "other",
        )
    with pytest.raises(ValueError, match=r"trainer.resume=123 must be a run directory"):
        run(compose_cfg("trainer.resume=123"), tmp_path / "int")
    with pytest.raises(FileNotFoundError, match="trainer.resume=.*no checkpoints there"):
        run(compose_cfg(f"trainer.resume={tmp_path / 'nowhere'}"), tmp_path / "none")


def test_a_run_that_dies_after_a_checkpoint_resumes_from_it_with_a_disk_store(
    compose_cfg, tiny_dataset, tmp_path, monkeypatch
):
    # The first run dies at its final checkpoint (step 8): its disk store was written in place
    # after the step-5 checkpoint, and its undo journal rolls it back to step 5 on resume.
    from dlrm.trainer import Trainer

    extra = BACKENDS["cached_disk"]
    straight = run(compose_cfg(*extra, "trainer.max_steps=16"), tmp_path / "straight")
    save = Trainer.save_checkpoint

    def dies_at_8(self):
        if self.state.step == 8:
            raise RuntimeError("killed")
        return save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", dies_at_8)
    with pytest.raises(RuntimeError, match="killed"):
        run(compose_cfg(*extra, "trainer.max_steps=8", "trainer.checkpoint_every=5"), tmp_path / "first")
    monkeypatch.undo()
    assert sorted(checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)) == [5]
    resumed = run(
        compose_cfg(*extra, "trainer.max_steps=16", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "resumed"
    )
    assert _metrics(resumed) == pytest.approx(_metrics(straight), abs=1e-6)


def test_a_checkpoint_from_before_the_table_kernel_choice_names_the_kernel_to_resume_with(tmp_path):
    """Checkpoints written before optim.sparse.kernel existed hold fbgemm's table state."""
    from dlrm.checkpoint import check_config

    old = {"optim": {"dense": {"name": "adam"}, "sparse": {"name": "rowwise_adagrad", "lr": 0.1}}}
    now = {"optim": {"dense": {"name": "adam"}, "sparse": {"name": "rowwise_adagrad", "lr": 0.1, "kernel": "auto"}}}
    with pytest.raises(ValueError, match=r"optim.sparse.kernel=fbgemm in the checkpoint, auto now.*written by the fbgemm kernel: add optim.sparse.kernel=fbgemm"):
        check_config(old, now, tmp_path / "step-3.pt")
    now["optim"]["sparse"]["kernel"] = "fbgemm"
    check_config(old, now, tmp_path / "step-3.pt")  # the same kernel: resumes
    now["optim"]["sparse"]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"optim.sparse.lr=0.1 in the checkpoint, 0.5 now; resume with the same [^(]*$"):
        check_config(old, now, tmp_path / "step-3.pt")  # another lr: no kernel hint


def test_a_checkpoint_resumes_under_another_table_kernel_setting(compose_cfg, tiny_dataset, tmp_path):
    """optim.sparse.kernel=auto (our C kernel on CPU) written, torch (our PyTorch ops, the same
    buffers) resumed: allowed, and it ends where the unbroken run ends."""
    from dlrm.checkpoint import check_config

    saved = {"optim": {"sparse": {"name": "rowwise_adagrad", "kernel": "auto"}}}
    for kernel in ("native", "torch", "fbgemm"):
        check_config(saved, {"optim": {"sparse": {"name": "rowwise_adagrad", "kernel": kernel}}}, tmp_path / "s.pt")
    straight = run(compose_cfg("trainer.max_steps=6"), tmp_path / "straight")
    run(compose_cfg("trainer.max_steps=3", "trainer.checkpoint_every=3"), tmp_path / "first")
    again = run(
        compose_cfg("trainer.max_steps=6", "optim.sparse.kernel=torch", f"trainer.resume={tmp_path / 'first'}"),
        tmp_path / "again",
    )
    assert _metrics(again) == pytest.approx(_metrics(straight), abs=1e-4)


@pytest.mark.parametrize("written, resumed", [("torch", "fbgemm"), ("fbgemm", "torch")])
def test_a_checkpoint_resumes_under_the_other_table_kernel(
    compose_cfg, tiny_dataset, tmp_path, monkeypatch, written, resumed
):
    """optim.sparse.kernel=auto is ours on CPU and fbgemm's on CUDA: a CPU checkpoint resumed on
    CUDA has the same config but another table layout (simulated here by making auto resolve to
    the other kernel). The per-table copy in the checkpoint converts it: the resumed run's tables
    start as the checkpoint's and it ends where an unbroken run of the written kernel ends."""
    import dlrm.embeddings.tables
    import dlrm.trainer

    def resolve(kernel):
        for mod in (dlrm.trainer, dlrm.embeddings.tables):
            monkeypatch.setattr(mod, "table_kernel", lambda optim, device: kernel)

    resolve(written)
    straight = run(compose_cfg("trainer.max_steps=6"), tmp_path / "straight")
    run(compose_cfg("trainer.max_steps=3", "trainer.checkpoint_every=3"), tmp_path / "first")
    saved = torch.load(checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)[3], weights_only=True)
    assert saved["table_kernel"] == written and list(saved["tables"]) == ["tbe"]
    loaded = {}
    load = dlrm.trainer.load_portable_tables

    def spy(backend, tables):  # what the resumed tables hold right after loading
        load(backend, tables)
        modules = list(dlrm.embeddings.tables.fused_modules(backend).values())
        loaded["kernels"] = [type(m).__name__ for m in modules]
        loaded["weights"] = [w.clone() for m in modules for w in m.split_embedding_weights()]
        loaded["states"] = [s.clone() for m in modules for table in m.split_optimizer_states() for s in table]

    monkeypatch.setattr(dlrm.trainer, "load_portable_tables", spy)
    resolve(resumed)
    again = run(compose_cfg("trainer.max_steps=6", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "again")
    assert loaded["kernels"] == ["BatchedTables" if resumed == "torch" else "SplitTableBatchedEmbeddingBagsCodegen"]
    states = [s for table in saved["tables"]["tbe"]["states"] for s in table]
    assert len(loaded["states"]) == len(states) > 0  # row-wise Adagrad: one state per table
    for ours, theirs in zip(loaded["weights"] + loaded["states"], saved["tables"]["tbe"]["weights"] + states, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert _metrics(again) == pytest.approx(_metrics(straight), abs=1e-4)


def test_a_checkpoint_without_per_table_copies_names_the_kernel_to_resume_with(
    compose_cfg, tiny_dataset, tmp_path, monkeypatch
):
    """Checkpoints written before they held the per-table copy cannot change kernels: the resume
    names the setting to use (simulated by dropping the copy and auto resolving to fbgemm)."""
    run(compose_cfg("trainer.max_steps=3", "trainer.checkpoint_every=3"), tmp_path / "first")
    path = checkpoint_files(tmp_path / "first" / CHECKPOINT_DIR)[3]
    state = torch.load(path, weights_only=True)
    assert state["table_kernel"] == "torch"
    del state["tables"]
    torch.save(state, path)
    import dlrm.trainer

    monkeypatch.setattr(dlrm.trainer, "table_kernel", lambda optim, device: "fbgemm")
    with pytest.raises(ValueError, match=r"written by the torch table kernel.*optim.sparse.kernel=torch"):
        run(compose_cfg("trainer.max_steps=6", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "again")


def test_a_checkpoint_during_warm_up_is_not_subtracted_from_the_timed_window(
    compose_cfg, tiny_dataset, tmp_path, monkeypatch
):
    """With 4 warm-up steps, a 6-step run times steps 4-6; its step-3 checkpoint came before that window. Subtracting
    it anyway gave negative samples/s (found by a new-user trial; Kaggle-size tables take 11 s
    to save, stood in for here by a slow save)."""
    import time

    from dlrm.trainer import Trainer

    save = Trainer.save_checkpoint

    def slow_save(self, *args, **kwargs):
        time.sleep(0.5)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_checkpoint", slow_save)
    cfg = compose_cfg("trainer.max_steps=6", "trainer.warmup_steps=4", "trainer.checkpoint_every=3", "trainer.eval_every=0")
    res = run(cfg, tmp_path / "r")
    steps_only = res["global_batch_size"] / (res["step_time_ms"] / 1e3)  # samples/s of the median step
    assert 0 < res["samples_per_s"] <= 2 * steps_only


@pytest.mark.parametrize("store", ["tt", "cached_tt"])
def test_a_tt_checkpoint_resumes_under_the_other_tt_kernel(store, compose_cfg, tiny_dataset, tmp_path):
    """emb.kernel (emb.tt.kernel under emb=cached) picks TT's C kernels or PyTorch ops: the same
    cores and Adagrad state, so a checkpoint written under one resumes under the other (and ends
    where an uninterrupted run does, up to the kernels' fp32 rounding); other TT settings still
    refuse."""
    extra = BACKENDS[store]
    key = "emb.kernel" if store == "tt" else "emb.tt.kernel"
    straight = run(compose_cfg(*extra, f"{key}=native", "trainer.max_steps=16"), tmp_path / "straight")
    run(compose_cfg(*extra, f"{key}=native", "trainer.max_steps=8", "trainer.checkpoint_every=8"), tmp_path / "first")
    resumed = run(
        compose_cfg(*extra, f"{key}=torch", "trainer.max_steps=16", f"trainer.resume={tmp_path / 'first'}"),
        tmp_path / "resumed",
    )
    assert resumed["resumed_from_step"] == 8
    assert _metrics(resumed) == pytest.approx(_metrics(straight), abs=1e-4)
    with pytest.raises(ValueError, match=r"rank=4 in the checkpoint, 8 now"):
        run(compose_cfg(*extra[:-1], "rank=8", "trainer.max_steps=16", f"trainer.resume={tmp_path / 'first'}"),
            tmp_path / "refused")

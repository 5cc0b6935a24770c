"""Our table kernels (dlrm/embeddings/table_kernel.py: PyTorch ops; table_native.py: C) against
fbgemm's TBE: the same lookups and the same fused updates, step after step, for every optimizer,
pooling, precision and mixed dims."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.table_kernel import BatchedTables
from dlrm.embeddings.tables import fused_tables, table_kernel, table_layout, tbe_bytes
from dlrm.options import ConfigError

CPU = torch.device("cpu")
# two features share table "a"; "c" is narrower, so the kernel keeps two dim groups
TABLES = [TableSpec("a", 50, 8, ("a", "a2")), TableSpec("b", 30, 8, ("b",)), TableSpec("c", 20, 4, ("c",))]
ROWS = [50, 50, 30, 20]  # per feature
WIDTH = 8 + 8 + 8 + 4


def optim(name: str, kernel: str):
    return OmegaConf.create({"name": name, "lr": 0.1, "eps": 1e-8, "kernel": kernel})


def random_batch(g: torch.Generator, batch: int = 6, one_hot: bool = False):
    """Key-major bags of 0-3 ids (or exactly one: the kernel's one-hot path), ids with repeats."""
    lengths = torch.randint(0, 4, (len(ROWS) * batch,), generator=g)
    if one_hot:
        lengths = torch.ones_like(lengths)
    values = torch.cat([torch.randint(0, ROWS[i // batch], (int(n),), generator=g) for i, n in enumerate(lengths)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return values, offsets, lengths


OURS = ["torch", "native"]  # our kernels: PyTorch ops, C


@pytest.mark.parametrize("ours", OURS)
@pytest.mark.parametrize("one_hot", [False, True], ids=["multi_hot", "one_hot"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("name", ["sgd", "rowwise_adagrad", "adagrad"])
def test_lookups_and_updates_match_fbgemm(name, pooling, precision, one_hot, ours):
    pair = {}
    for kernel in ("fbgemm", ours):
        torch.manual_seed(0)  # the same initial rows
        pair["torch" if kernel == ours else kernel] = fused_tables(TABLES, optim(name, kernel), pooling, CPU, precision)
    assert isinstance(pair["torch"], BatchedTables) and pair["torch"].kernel == ours
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        values, offsets, _ = random_batch(g, one_hot=one_hot)
        grad = torch.randn(6, WIDTH, generator=g)
        outs = []
        for module in pair.values():
            out = module(values, offsets)
            out.backward(grad)
            outs.append(out.detach())
        assert outs[1].dtype == torch.float32 and outs[1].shape == (6, WIDTH)
        torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    # fp16 rows: at most one fp16 ulp apart (fbgemm's row-wise mean of g^2 sums in another order)
    tol = {"fp32": dict(atol=1e-6, rtol=1e-6), "fp16": dict(atol=4e-6, rtol=1e-3)}[precision]
    for w_fb, w_ours in zip(pair["fbgemm"].split_embedding_weights(), pair["torch"].split_embedding_weights()):
        assert w_ours.dtype == w_fb.dtype and w_ours.shape == w_fb.shape
        torch.testing.assert_close(w_ours.float(), w_fb.float(), **tol)
        assert not torch.equal(w_ours.float(), w_ours.float().clone().uniform_())  # trained, not zero
    states = list(zip(pair["fbgemm"].split_optimizer_states(), pair["torch"].split_optimizer_states()))
    assert len(states) == (0 if name == "sgd" else len(TABLES))
    for (s_fb,), (s_ours,) in states:
        assert s_ours.shape == s_fb.shape
        torch.testing.assert_close(s_ours, s_fb, atol=1e-6, rtol=1e-5)
    assert tbe_bytes(pair["torch"]) == tbe_bytes(pair["fbgemm"])


@pytest.mark.parametrize("ours", OURS)
@pytest.mark.parametrize("one_hot", [False, True], ids=["multi_hot", "one_hot"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_lookups_without_autograd_gather_directly_and_give_the_same_bags(pooling, precision, one_hot, ours):
    """Evaluation (no_grad) gathers every id's row instead of the distinct rows: same bags, bit
    for bit, with mixed dims, shared tables and per-sample weights; nothing is updated."""
    torch.manual_seed(0)
    tables = fused_tables(TABLES, optim("rowwise_adagrad", ours), pooling, CPU, precision)
    before = [w.clone() for w in tables.split_embedding_weights()]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        values, offsets, _ = random_batch(g, one_hot=one_hot)
        weights = torch.rand(values.numel(), generator=g) if pooling == "sum" else None
        with torch.no_grad():
            direct = tables(values, offsets, weights)
        with torch.enable_grad():
            training = tables(values, offsets, weights)  # the distinct-rows path (not stepped)
        assert training.requires_grad and not direct.requires_grad
        assert torch.equal(direct, training.detach())
    assert all(torch.equal(a, b) for a, b in zip(before, tables.split_embedding_weights()))


@pytest.mark.parametrize("ours", OURS)
def test_only_the_looked_up_rows_change_and_duplicates_are_summed_once(ours):
    """Row-wise Adagrad by hand: row 3 looked up twice gets one update with the summed gradient."""
    tables = fused_tables([TableSpec("t", 10, 2, ("x",))], optim("rowwise_adagrad", ours), "sum", CPU)
    w = tables.split_embedding_weights()[0]
    before = w.clone()
    out = tables(torch.tensor([3, 3, 7]), torch.tensor([0, 1, 2, 3]))  # 3 bags of one id
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]])
    out.backward(grad)
    for row, g in ((3, torch.tensor([4.0, 6.0])), (7, torch.tensor([0.5, 0.5]))):
        state = g.square().mean()
        torch.testing.assert_close(w[row], before[row] - 0.1 * g / (state.sqrt() + 1e-8))
        torch.testing.assert_close(tables.split_optimizer_states()[0][0][row], state)
    changed = (w != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7]


@pytest.mark.parametrize("ours", OURS)
@pytest.mark.parametrize("one_hot", [False, True], ids=["multi_hot", "one_hot"])
def test_per_sample_weights_scale_lookups_and_gradients(one_hot, ours):
    pair = {}
    for kernel in ("fbgemm", ours):
        torch.manual_seed(0)
        pair["torch" if kernel == ours else kernel] = fused_tables(TABLES[:1], optim("sgd", kernel), "sum", CPU)
    # 2 features x 2 bags
    values, offsets = torch.tensor([1, 4, 4, 9, 2]), torch.tensor([0, 2, 3, 5, 5])
    if one_hot:
        values, offsets = torch.tensor([1, 4, 4, 9]), torch.tensor([0, 1, 2, 3, 4])
    scale = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.5])[: values.numel()]
    grad = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    outs = [module(values, offsets, per_sample_weights=scale) for module in pair.values()]
    torch.testing.assert_close(outs[1], outs[0])
    for out in outs:
        out.backward(grad)
    torch.testing.assert_close(
        pair["torch"].split_embedding_weights()[0], pair["fbgemm"].split_embedding_weights()[0], atol=1e-6, rtol=1e-6
    )
    with pytest.raises(ValueError, match="sum pooling"):
        fused_tables(TABLES[:1], optim("sgd", "torch"), "mean", CPU)(values, offsets, per_sample_weights=scale)


def test_kernel_choice_and_its_error():
    assert table_kernel(optim("sgd", "auto"), CPU) == "native"
    assert table_kernel(optim("sgd", "auto"), torch.device("cuda")) == "fbgemm"
    assert table_kernel(OmegaConf.create({"name": "sgd", "lr": 0.1}), CPU) == "native"  # key absent: auto
    assert table_layout("native") == table_layout("torch") == "torch" and table_layout("fbgemm") == "fbgemm"
    with pytest.raises(ConfigError, match=r"^optim.sparse.kernel='cuda': choose one of"):
        fused_tables(TABLES, optim("sgd", "cuda"), "sum", CPU)
    with pytest.raises(ConfigError, match=r"^optim.sparse.kernel=native runs on CPU, not cuda"):
        table_kernel(optim("sgd", "native"), torch.device("cuda"))


def test_without_a_compiler_auto_warns_once_and_runs_pytorch_native_is_one_line(no_compiler, caplog):
    with caplog.at_level(logging.WARNING, logger="dlrm.kernels.build"):
        assert table_kernel(optim("sgd", "auto"), CPU) == "torch"
        assert table_kernel(optim("sgd", "auto"), CPU) == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        (
            "optim.sparse.kernel=auto: tables run in PyTorch ops (slower on CPU): "
            "no C compiler ('no-such-cc' not on PATH; set $CC) to build tables.c"
        )
    ]
    with pytest.raises(ConfigError, match=r"^optim.sparse.kernel=native: no C compiler .*; optim.sparse.kernel=torch"):
        table_kernel(optim("sgd", "native"), CPU)


def test_native_names_an_id_outside_its_table_and_the_backend_names_the_feature():
    module = fused_tables(TABLES, optim("sgd", "native"), "sum", CPU)
    # 4 features x 1 bag: the third feature (table b, 30 rows) has id 30
    values, offsets = torch.tensor([1, 2, 30, 3]), torch.tensor([0, 1, 2, 3, 4])
    with pytest.raises(IndexError, match=r"^id 30 at position 2 \(feature 2\) is outside its table's 30 rows$"):
        module(values, offsets)
    with pytest.raises(IndexError, match=r"^id -1 at position 0 \(feature 0\)"):
        module(torch.tensor([-1, 2, 3, 3]), offsets)
    emb = build_embeddings(TABLES[1:2], OmegaConf.create({"name": "full", "dim": 8}), optim("sgd", "native"), CPU)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(["b"], torch.tensor([4, 31]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"^feature b: ids must be in \[0, 30\) but the batch has ids in \[4, 31\]$"):
        emb(kjt)


@pytest.mark.parametrize("name", ["rowwise_adagrad", "adagrad"])
def test_native_results_do_not_depend_on_the_thread_count(name):
    """Each row is summed and stepped by one thread: 1 or 2 threads give the same bits."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            module = fused_tables(TABLES, optim(name, "native"), "sum", CPU)
            g = torch.Generator().manual_seed(5)
            outs = []
            for _ in range(3):
                values, offsets, _ = random_batch(g, batch=64)
                out = module(values, offsets)
                out.backward(torch.randn(64, WIDTH, generator=g))
                outs.append(out.detach())
            results.append((outs, [w.clone() for w in module.split_embedding_weights()]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ours", OURS)
@pytest.mark.parametrize("backend", ["full", "hashed", "qr", "mde"])
def test_backends_train_alike_on_both_kernels(backend, ours):
    """A whole backend (its id transform in front of the tables) gives the same outputs and
    updates on either kernel over a few steps."""
    tables = [TableSpec("t_C1", 200, 8, ("C1",)), TableSpec("t_C2", 30, 8, ("C2",))]
    cfg = OmegaConf.create({"name": backend, "dim": 8, "compression": 4, "min_rows": 50})
    built = {}
    for kernel in ("fbgemm", ours):
        torch.manual_seed(0)
        built["torch" if kernel == ours else kernel] = build_embeddings(tables, cfg, optim("rowwise_adagrad", kernel), CPU)
    g = torch.Generator().manual_seed(3)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    for _ in range(4):
        ids = torch.cat([torch.randint(0, 200, (16,), generator=g), torch.randint(0, 30, (16,), generator=g)])
        kjt = KeyedJaggedTensor.from_lengths_sync(["C1", "C2"], ids, torch.ones(32, dtype=torch.int64))
        grad = torch.randn(16, 16, generator=g)
        outs = []
        for emb in built.values():
            out = emb(kjt).values()
            out.backward(grad)
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert built["torch"].embedding_bytes() == built["fbgemm"].embedding_bytes()


def test_the_tables_benchmark_times_both_kernels():
    from dlrm.bench.tables import main

    out = main(["--max-rows", "1000", "--batch-size", "64", "--batches", "2", "--rounds", "1", "--threads", "1"])
    assert out["torch_median_ms"] > 0 and out["fbgemm_median_ms"] > 0 and out["native_median_ms"] > 0
    assert out["fbgemm_over_torch"] > 0 and out["torch_over_native"] > 0


def test_init_is_parallel_but_depends_only_on_the_seed(monkeypatch):
    """init_uniform_ fills chunks on several threads, each from its own seeded generator: the same
    seed gives the same table on 1 or 2 threads, inside the bound, and chunks are not repeats."""
    from dlrm.embeddings import tables

    monkeypatch.setattr(tables, "INIT_CHUNK_ROWS", 1000)
    threads = torch.get_num_threads()

    def init(seed: int, n_threads: int) -> torch.Tensor:
        torch.set_num_threads(n_threads)
        torch.manual_seed(seed)
        return tables.init_uniform_(torch.empty(4500, 8), 100)

    try:
        one, two, other = init(3, 1), init(3, 2), init(4, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(one, other)
    assert one.abs().max() <= 0.1 and one.std() > 0.05  # U(-0.1, 0.1): std 0.058
    assert not torch.equal(one[:1000], one[1000:2000])

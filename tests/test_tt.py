"""emb=tt: TT shapes, init, exact forward/backward against the materialized table, bytes, config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.schema import KAGGLE_CARDINALITIES
from dlrm.embeddings import TableSpec, build_embeddings
from dlrm.embeddings.tt import TTEmbeddings
from dlrm.embeddings.tt_autograd import TTRows, plan_levels
from dlrm.embeddings.tt_kernels import (
    _prefixes,
    factor_dim,
    factor_rows,
    init_cores,
    materialize,
    tt_embedding_bag,
    tt_rows,
    tt_rows_multi,
    tt_rows_naive,
    tt_shape,
)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
CPU = torch.device("cpu")
SPARSE_OPTIM = OmegaConf.create({"name": "sgd", "lr": 0.05, "eps": 1e-8})
LARGEST_KAGGLE = sorted(KAGGLE_CARDINALITIES, reverse=True)[:7]


def emb_cfg(**overrides):
    """The emb section as Hydra composes it from conf/emb/tt.yaml, with overrides."""
    args = ["emb=tt"] + [f"{k}={v}" for k, v in overrides.items()]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=args)
    return cfg.emb


def kjt(keys, per_key_lists):
    """KJT from, per key, a list of bags (lists of ids)."""
    lengths = [len(bag) for bags in per_key_lists for bag in bags]
    values = [i for bags in per_key_lists for bag in bags for i in bag]
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.tensor(values, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
    )


def random_bags(rows, batch, max_len, gen):
    lens = torch.randint(0, max_len + 1, (batch,), generator=gen).tolist()
    return [torch.randint(0, rows, (n,), generator=gen).tolist() for n in lens]


# --- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cores", [2, 3, 4])
@pytest.mark.parametrize("rows", LARGEST_KAGGLE + [93145, 100_000, 1000])
def test_row_factors_cover_rows_with_little_padding_and_balance(rows, cores):
    f = factor_rows(rows, cores)
    assert len(f) == cores and list(f) == sorted(f)
    assert rows <= math.prod(f) <= 1.15 * rows
    assert max(f) / min(f) < 1.5  # balanced: TT-Rec's examples go up to 250/200 = 1.25


def test_row_factors_match_tt_rec_examples():
    # TT-Rec: 10,131,227 -> [200, 220, 250]; 100,000 -> [40, 50, 50]; 7,046,547 -> [200]*3.
    assert all(180 <= f <= 260 for f in factor_rows(10_131_227, 3))
    assert all(40 <= f <= 50 for f in factor_rows(100_000, 3))
    assert all(170 <= f <= 215 for f in factor_rows(7_046_547, 3))


def test_dim_factors():
    assert factor_dim(16, 3) == (2, 2, 4)
    assert factor_dim(64, 3) == (4, 4, 4)
    assert factor_dim(16, 2) == (4, 4)
    assert factor_dim(16, 4) == (2, 2, 2, 2)


def test_shape_errors_name_the_table():
    with pytest.raises(ValueError, match="t_X.*cover 1000 < 1001"):
        tt_shape(1001, 16, row_factors=[10, 10, 10], name="t_X")
    with pytest.raises(ValueError, match="t_X.*multiply to 8, not dim 16"):
        tt_shape(1000, 16, dim_factors=[2, 2, 2], name="t_X")
    with pytest.raises(ValueError, match="t_X: TT cores must be 2, 3 or 4"):
        tt_shape(1000, 16, cores=5, name="t_X")
    with pytest.raises(ValueError, match="t_X.*2 ranks"):
        tt_shape(1000, 16, cores=3, ranks=[4], name="t_X")


def test_param_count_formula():
    s = tt_shape(10_131_227, 16, cores=3, rank=32, row_factors=[200, 220, 250])
    assert s.core_shapes == [(200, 1, 2, 32), (220, 32, 2, 32), (250, 32, 4, 1)]
    assert s.num_params == 200 * 2 * 32 + 220 * 32 * 2 * 32 + 250 * 32 * 4
    s = tt_shape(1000, 16, cores=3, ranks=[4, 8])
    p, q = s.row_factors, s.dim_factors
    assert s.num_params == p[0] * q[0] * 4 + p[1] * 4 * q[1] * 8 + p[2] * 8 * q[2]


# --- init -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores", [2, 3, 4])
def test_init_reconstructs_uniform_baseline_variance(cores):
    """Table std ~ 1/sqrt(3n), the std of U(-1/sqrt(n), 1/sqrt(n)); mean ~ 0."""
    n = 50_000
    shape = tt_shape(n, 16, cores=cores, rank=16)
    variances, means = [], []
    for seed in range(8):  # one draw fluctuates by a few %: cores have few thousand entries
        table = materialize(init_cores(shape, torch.Generator().manual_seed(seed)), shape)
        variances.append(float(table.double().var()))
        means.append(float(table.double().mean()))
    std = math.sqrt(sum(variances) / len(variances))
    assert std == pytest.approx(1 / math.sqrt(3 * n), rel=0.04)
    assert abs(sum(means) / len(means)) < 0.05 / math.sqrt(3 * n)


# --- exactness --------------------------------------------------------------------------------


def double_cores(shape, seed=0):
    cores = init_cores(shape, torch.Generator().manual_seed(seed), torch.float64)
    return [c.requires_grad_() for c in cores]


def grads(out, w, params):
    return torch.autograd.grad((out * w).sum(), params)


def assert_close(a, b, tol=1e-10):
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp(min=1e-300)
    assert float((a - b).abs().max() / scale) < tol


@pytest.mark.parametrize("cores", [2, 3, 4])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("method", ["auto", "grouped", "gather"])
def test_bags_match_materialized_table(cores, mode, method):
    """Pooled output and core gradients equal those of the full table rebuilt from the cores."""
    rows = 3000
    shape = tt_shape(rows, 16, cores=cores, rank=5)
    params = double_cores(shape)
    gen = torch.Generator().manual_seed(cores)
    bags = random_bags(rows, 64, 6, gen) + [[], [7, 7, 7]]  # empty bag, repeated ids
    offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
    ids = torch.tensor([i for b in bags for i in b])

    out = tt_embedding_bag(params, shape, ids, offsets, mode, method)
    full = materialize(params, shape)
    ref = F.embedding_bag(ids, full, offsets, mode=mode, include_last_offset=True)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    assert_close(out, ref)
    for g, g_ref in zip(grads(out, w, params), grads(ref, w, params)):
        assert_close(g, g_ref)


@pytest.mark.parametrize("cores", [2, 3, 4])
@pytest.mark.parametrize("skew", ["uniform", "hot"])
def test_fast_path_equals_naive_per_id_gather(cores, skew):
    rows = 20_000
    shape = tt_shape(rows, 16, cores=cores, rank=6)
    params = double_cores(shape, seed=1)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, rows, (500,), generator=gen)
    if skew == "hot":  # many ids sharing leading digits: big groups, shared prefixes
        ids = ids % 300
    uid = torch.unique(ids)
    fast = tt_rows(params, shape, uid)
    naive = tt_rows_naive(params, shape, uid)
    w = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    assert_close(fast, naive)
    for g, g_ref in zip(grads(fast, w, params), grads(naive, w, params)):
        assert_close(g, g_ref)


@pytest.mark.parametrize("chunk", [1, 2, 3, None])
def test_grouped_chunks_with_overflow_equal_naive(chunk):
    """Grouped cores in chunks of c prefixes, the hot digits spilling into overflow chunks that
    run against copies of their slices: values and core gradients as the per-id gather."""
    rows = 20_000
    shape = tt_shape(rows, 16, cores=3, rank=6)
    params = double_cores(shape, seed=3)
    gen = torch.Generator().manual_seed(4)
    ids = torch.cat([torch.randint(0, rows, (300,), generator=gen), torch.randint(0, 400, (300,), generator=gen)])
    uid = torch.unique(ids)
    digits, parents = _prefixes([shape], None, uid)
    levels = plan_levels(digits, parents, shape.core_shapes, shape.dim_factors, "grouped", chunk)
    if chunk is not None and chunk < 3:
        assert all(lv.extra is not None for lv in levels)  # the overflow path runs
    fast = TTRows.apply(levels, shape, None, *params)
    naive = tt_rows_naive(params, shape, uid)
    w = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    assert_close(fast, naive)
    for g, g_ref in zip(grads(fast, w, params), grads(naive, w, params)):
        assert_close(g, g_ref)


@pytest.mark.parametrize("method", ["auto", "grouped", "gather"])
def test_multi_table_lookup_equals_each_table_alone(method):
    """Tables of different row factors (and hence sizes, digit counts, padding) in ONE lookup."""
    shapes = [tt_shape(n, 16, cores=3, rank=5) for n in (20_000, 3_000, 700)]
    assert len({s.row_factors for s in shapes}) == 3
    params = [double_cores(s, seed=i) for i, s in enumerate(shapes)]
    gen = torch.Generator().manual_seed(5)
    uids = [torch.unique(torch.randint(0, s.rows, (200,), generator=gen) % (s.rows // k)) for k, s in
            zip((1, 20, 1), shapes)]  # the middle table's ids hot: its digits crowd
    table = torch.cat([torch.full((len(u),), t) for t, u in enumerate(uids)])
    out = tt_rows_multi(params, shapes, table, torch.cat(uids), method)
    ref = torch.cat([tt_rows_naive(p, s, u) for p, s, u in zip(params, shapes, uids)])
    flat = [c for p in params for c in p]
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    assert_close(out, ref)
    for g, g_ref in zip(grads(out, w, flat), grads(ref, w, flat)):
        assert_close(g, g_ref)


def test_multi_table_lookup_needs_equal_ranks_and_dims():
    shapes = [tt_shape(3000, 16, rank=4), tt_shape(3000, 16, rank=5)]
    params = [init_cores(s) for s in shapes]
    with pytest.raises(ValueError, match="differ in dim factors or ranks"):
        tt_rows_multi(params, shapes, torch.tensor([0, 1]), torch.tensor([3, 4]))


def test_padding_rows_are_never_read():
    """Leading-core slices that only padded ids use are poisoned: valid ids never see them."""
    shape = tt_shape(1000, 16, rank=4, row_factors=[12, 10, 10])  # ids 1000..1199 are padding
    params = double_cores(shape)
    with torch.no_grad():
        params[0][10:] = float("nan")  # digit i1 >= 10 <=> id >= 1000
    ids = torch.arange(1000)
    out = tt_rows(params, shape, ids)
    assert torch.isfinite(out).all()
    (g0, *_) = torch.autograd.grad(out.sum(), params)
    assert torch.isfinite(g0).all() and (g0[10:] == 0).all()


# --- the backend ------------------------------------------------------------------------------


def test_backend_built_from_config_compresses_only_large_tables():
    cfg = emb_cfg(rank=8, **{"emb.min_rows": 5000})
    assert cfg.rank == 8  # ${rank} from the top level: `emb=tt rank=8`
    tables = [
        TableSpec("t_C1", 20_000, 16, ("C1",)),
        TableSpec("t_C2", 300, 16, ("C2",)),
    ]
    emb = build_embeddings(tables, cfg, SPARSE_OPTIM, CPU)
    text = emb.describe()
    assert "t_C1: tt 20000 x 16" in text and "ranks [1, 8, 8, 1]" in text
    assert "t_C2: full 300 x 16" in text
    stats = emb.stats()
    assert set(stats) == {"tt_compression_t_C1"} and stats["tt_compression_t_C1"] > 1
    out = emb(kjt(["C1", "C2"], [[[1], [19_999]], [[0, 1], []]]))
    assert out.values().shape == (2, 32) and set(out.keys()) == {"C1", "C2"}
    assert [type(o).__name__ for o in emb.optimizers()] == ["Adagrad"]


@pytest.mark.parametrize("ranks, fused", [("", True), (", ranks: [3, 4]", False)])
def test_backend_forward_backward_matches_materialized_tables(ranks, fused):
    """Through KJT and KeyedTensor: two tables, one of them shared by two features, mean pooling;
    one lookup for both tables (equal ranks), or one per table (t_A's ranks differ)."""
    shapes = f"{{t_A: {{rows: [10, 12, 15]{ranks}}}}}"
    cfg = emb_cfg(rank=4, **{"emb.pooling": "mean", "emb.shapes": shapes})
    tables = [TableSpec("t_A", 1700, 16, ("A",)), TableSpec("t_B", 900, 16, ("B1", "B2"))]
    emb = TTEmbeddings(tables, cfg, SPARSE_OPTIM, CPU).double()
    assert emb.shapes["t_A"].row_factors == (10, 12, 15)
    assert emb._fused is fused
    gen = torch.Generator().manual_seed(0)
    bags = [random_bags(1700, 8, 4, gen), random_bags(900, 8, 4, gen), random_bags(900, 8, 4, gen)]
    features = kjt(["A", "B1", "B2"], bags)
    out = emb(features)
    params = list(emb.parameters())
    w = torch.randn(out.values().shape, generator=gen, dtype=torch.float64)
    got = grads(out.values(), w, params)

    blocks = []
    for key, table, key_bags in zip(["A", "B1", "B2"], ["t_A", "t_B", "t_B"], bags):
        full = materialize(list(emb.cores[table]), emb.shapes[table])
        ids = torch.tensor([i for b in key_bags for i in b], dtype=torch.long)
        offsets = torch.tensor([0] + [len(b) for b in key_bags]).cumsum(0)
        blocks.append(F.embedding_bag(ids, full, offsets, mode="mean", include_last_offset=True))
        assert_close(out[key], blocks[-1])
    ref = torch.cat(blocks, 1)
    for g, g_ref in zip(got, grads(ref, w, params)):
        assert_close(g, g_ref)


def test_backend_empty_batch_gives_empty_output():
    """A rank's empty share of an eval batch (distributed): [0, F * D] out, no error."""
    cfg = emb_cfg(rank=4)
    tables = [TableSpec("t_A", 1700, 16, ("A",)), TableSpec("t_B", 900, 16, ("B",))]
    emb = TTEmbeddings(tables, cfg, SPARSE_OPTIM, CPU)
    empty = KeyedJaggedTensor(keys=["A", "B"], values=torch.zeros(0, dtype=torch.long),
                              lengths=torch.zeros(0, dtype=torch.long), stride=0)
    assert emb(empty).values().shape == (0, 32)


def test_out_of_range_id_is_an_error_naming_the_feature():
    tables = [TableSpec("t_A", 1000, 16, ("A",)), TableSpec("t_B", 1000, 16, ("B",))]
    emb = TTEmbeddings(tables, emb_cfg(rank=4), SPARSE_OPTIM, CPU)
    # 1000 is inside the padded grid (prod(p) >= 1000) for some factorings: must still fail
    with pytest.raises(ValueError, match=r"feature B: ids must be in \[0, 1000\)"):
        emb(kjt(["A", "B"], [[[5]], [[1000]]]))
    with pytest.raises(ValueError, match="feature A"):
        emb(kjt(["A", "B"], [[[-1]], [[3]]]))


def test_bytes_match_formula_and_count_optimizer_state():
    tables = [TableSpec("t_A", 5000, 16, ("A",))]
    adagrad = TTEmbeddings(tables, emb_cfg(rank=8), SPARSE_OPTIM, CPU)
    n = adagrad.shapes["t_A"].num_params
    # fp32 cores + Adagrad's per-entry sum + one fp32 step counter per core
    assert adagrad.embedding_bytes() == 4 * n + 4 * n + 4 * 3
    assert adagrad.stats()["tt_compression_t_A"] == pytest.approx(5000 * 17 * 4 / (8 * n + 12))
    sgd = TTEmbeddings(tables, emb_cfg(rank=8, **{"emb.optimizer": "sgd"}), SPARSE_OPTIM, CPU)
    assert sgd.embedding_bytes() == 4 * n


def test_kaggle_tables_at_rank_32_fit_in_20_mb():
    tables = [TableSpec(f"t_{i}", n, 16, (f"F{i}",)) for i, n in enumerate(LARGEST_KAGGLE)]
    emb = build_embeddings(tables, emb_cfg(rank=32), SPARSE_OPTIM, CPU)
    assert isinstance(emb, TTEmbeddings)  # all 7 are >= min_rows
    assert emb.embedding_bytes() <= 20 * 2**20
    assert emb.full_bytes() / emb.embedding_bytes() > 100


def test_optimizer_steps_only_touched_slices():
    """PyTorch kernels: gradients, then the optimizer steps the touched slices. C kernels: the
    middle core is stepped inside backward (no gradient), the others by the optimizer; the cores
    end up the same."""
    tables = [TableSpec("t_A", 1000, 16, ("A",))]
    for name in ["adagrad", "sgd"]:
        after = {}
        for kernel in ["torch", "native"]:
            shapes = "{A: {rows: [10, 10, 10]}}"
            cfg = emb_cfg(rank=4, **{"emb.optimizer": name, "emb.lr": 0.1, "emb.shapes": shapes, "emb.kernel": kernel})
            torch.manual_seed(0)
            emb = TTEmbeddings(tables, cfg, SPARSE_OPTIM, CPU)
            before = [p.detach().clone() for p in emb.parameters()]
            out = emb(kjt(["A"], [[[123]], [[456]]]))  # leading digits 1 and 4, middle 2 and 5
            out.values().sum().backward()
            grads = [p.grad for p in emb.parameters()]
            assert (grads[1] is None) == (kernel == "native")  # stepped in backward
            expected = [b - 0.1 * g if g is not None else None for b, g in zip(before, grads)]
            (opt,) = emb.optimizers()
            opt.step()
            params = [p.detach() for p in emb.parameters()]
            for k, digits in enumerate([[1, 4], [2, 5]]):
                touched = torch.zeros(10, dtype=torch.bool)
                touched[digits] = True
                assert not torch.equal(params[k][touched], before[k][touched])
                assert torch.equal(params[k][~touched], before[k][~touched])
            if name == "sgd":  # plain SGD: exactly p - lr * grad
                for p, e in zip(params, expected):
                    if e is not None:
                        torch.testing.assert_close(p, e)
            after[kernel] = params
        for a, b in zip(after["native"], after["torch"]):
            torch.testing.assert_close(a, b)


def test_fused_tables_cores_live_in_one_stacked_tensor_per_core():
    """With one lookup for all tables, each table's core is a view of its rows in one stacked
    tensor per core (no concatenation per step); the optimizer's steps land there; a core that
    stopped aliasing (replaced `.data`) is stacked again, values kept."""
    tables = [TableSpec("t_A", 1000, 16, ("A",)), TableSpec("t_B", 500, 16, ("B",))]
    cfg = emb_cfg(rank=4, **{"emb.optimizer": "sgd", "emb.lr": 0.1})
    emb = TTEmbeddings(tables, cfg, SPARSE_OPTIM, CPU)
    features = kjt(["A", "B"], [[[123], [7]], [[456], [499]]])
    emb(features).values().sum().backward()
    stacked = emb.stacked_cores()
    a0, b0 = emb.cores["t_A"][0], emb.cores["t_B"][0]
    assert a0.data_ptr() == stacked[0].data_ptr()
    assert b0.data_ptr() == stacked[0][a0.shape[0]:].data_ptr()
    assert a0.grad.shape == a0.shape and b0.grad.shape == b0.shape
    before = stacked[0].clone()
    emb.optimizers()[0].step()
    assert not torch.equal(stacked[0], before)  # stepped in place, through the views
    values = b0.detach().clone()
    b0.data = b0.detach().clone()  # no longer a view of stacked[0]
    assert emb.stacked_cores()[0] is not stacked[0]
    assert torch.equal(emb.cores["t_B"][0].detach(), values)
    assert emb.cores["t_B"][0].data_ptr() == emb.stacked_cores()[0][a0.shape[0]:].data_ptr()


def test_explicit_tables_list_and_bad_config():
    tables = [TableSpec("t_C1", 2000, 16, ("C1",)), TableSpec("t_C2", 3000, 16, ("C2",))]
    emb = build_embeddings(tables, emb_cfg(rank=4, **{"emb.tables": "[C1]"}), SPARSE_OPTIM, CPU)
    assert "t_C1: tt" in emb.describe() and "t_C2: full" in emb.describe()
    with pytest.raises(ValueError, match="emb.shapes names \\['t_C9'\\]"):
        cfg = emb_cfg(**{"emb.shapes": "{t_C9: {rows: [10, 10, 20]}}"})
        TTEmbeddings(tables, cfg, SPARSE_OPTIM, CPU)
    with pytest.raises(ValueError, match="emb.optimizer='adam'"):
        TTEmbeddings(tables, emb_cfg(**{"emb.optimizer": "adam"}), SPARSE_OPTIM, CPU)
    with pytest.raises(ValueError, match="t_C1: TT cores must be 2, 3 or 4"):
        TTEmbeddings(tables, emb_cfg(**{"emb.cores": 5}), SPARSE_OPTIM, CPU)
    with pytest.raises(ValueError, match="t_C1.*2 ranks"):
        TTEmbeddings(tables, emb_cfg(**{"emb.ranks": "[8]"}), SPARSE_OPTIM, CPU)


def test_int32_ids_and_autocast_give_the_fp32_result():
    tables = [TableSpec("t_A", 5000, 16, ("A",))]
    emb = TTEmbeddings(tables, emb_cfg(rank=8), SPARSE_OPTIM, CPU)
    # enough ids that every core takes the grouped path (its transposed bmm has no out=)
    ids = torch.randint(0, 5000, (400,), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([2, 0] + [1] * 398)
    ref = emb(KeyedJaggedTensor.from_lengths_sync(["A"], ids, lengths)).values()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(KeyedJaggedTensor.from_lengths_sync(["A"], ids.int(), lengths.int())).values()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

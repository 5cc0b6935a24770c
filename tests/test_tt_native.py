"""TT's C kernels (emb.kernel, dlrm/embeddings/tt_native.py): the same rows and core gradients as
the per-id reference in float64, for every kernel layout; threads; the build and its failures."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from dlrm.config import ConfigError
from dlrm.embeddings import TableSpec, tt_native
from dlrm.embeddings.tt import TTEmbeddings
from dlrm.embeddings.tt_kernels import (
    init_cores,
    tt_rows,
    tt_rows_multi,
    tt_rows_naive,
    tt_shape,
)
from dlrm.embeddings.tt_native import NativeKernelError, use_native
from dlrm.kernels import build
from tests.test_tt import CONF, CPU, SPARSE_OPTIM, emb_cfg, kjt, random_bags


def cores_of(shape, seed=0):
    """fp32 cores (what the kernel runs) and float64 copies of them (the reference)."""
    cores = init_cores(shape, torch.Generator().manual_seed(seed))
    return [c.requires_grad_() for c in cores], [c.detach().double().requires_grad_() for c in cores]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def check_against_reference(out, ref, params, ref_params, seed=0):
    """Rows and every core's gradient within fp32 rounding of the float64 per-id reference."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert rel_err(out, ref) < 1e-5
    got = torch.autograd.grad((out.double() * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), ref_params)
    for g, g_ref in zip(got, want):
        assert g.shape == g_ref.shape
        assert rel_err(g, g_ref) < 1e-5


# dim, cores, rank -> the layouts of the levels after the first (tt_chain.c's tt_level_layout):
# rows kernels along J = q r' (NV = J / 8 in 1, 2, 4, 8, 16), cols along r (the last core,
# J = q < 8), plain loops otherwise.
LAYOUTS = [
    (16, 3, 32, [8, -1]),  # the default: [2, 32] @ [32, 64], then the last core by columns
    (16, 3, 8, [2, -1]),
    (16, 2, 16, [-1]),  # two cores: the second is the last
    (64, 3, 32, [16, -1]),
    (16, 4, 8, [2, 2, -1]),  # q = (2, 2, 2, 2): four cores
    (16, 3, 5, [0, 0]),  # rank 5: plain loops
    (16, 3, 4, [1, 0]),  # J = 8: one vector
]


@pytest.mark.parametrize("dim, cores, rank, layouts", LAYOUTS)
def test_rows_and_gradients_equal_the_per_id_reference(dim, cores, rank, layouts):
    shape = tt_shape(20_000, dim, cores=cores, rank=rank)
    lib = tt_native.library()
    assert [lib.tt_level_layout(r, q * r2) for (_, r, q, r2) in shape.core_shapes[1:]] == layouts
    params, ref_params = cores_of(shape)
    gen = torch.Generator().manual_seed(1)
    # a hot head (big digit groups, shared prefixes) and a uniform tail: enough prefixes that
    # two threads split the levels (tt_chain.c: n >= 256 per thread)
    ids = torch.cat([torch.randint(0, 300, (1500,), generator=gen), torch.randint(0, 20_000, (1500,), generator=gen)])
    uid = torch.unique(ids)
    out = tt_rows(params, shape, uid, kernel="native")
    assert out.dtype == torch.float32 and out.shape == (len(uid), dim)
    check_against_reference(out, tt_rows_naive(ref_params, shape, uid), params, ref_params)


def test_stacked_tables_equal_the_reference():
    """Several tables' cores stacked (what emb=tt runs): each table's rows and gradients."""
    shapes = [tt_shape(n, 16, cores=3, rank=8) for n in (20_000, 3_000, 700)]
    pairs = [cores_of(s, seed=i) for i, s in enumerate(shapes)]
    gen = torch.Generator().manual_seed(5)
    uids = [torch.unique(torch.randint(0, s.rows, (600,), generator=gen)) for s in shapes]
    table = torch.cat([torch.full((len(u),), t) for t, u in enumerate(uids)])
    out = tt_rows_multi([p for p, _ in pairs], shapes, table, torch.cat(uids), kernel="native")
    ref = torch.cat([tt_rows_naive(r, s, u) for (_, r), s, u in zip(pairs, shapes, uids)])
    flat = [c for p, _ in pairs for c in p]
    flat_ref = [c for _, r in pairs for c in r]
    check_against_reference(out, ref, flat, flat_ref)


def test_threads_split_at_digit_boundaries_and_results_repeat():
    """One and two threads agree to rounding (the second thread's parent gradients are summed
    apart, then added); the same thread count gives the same bits every time."""
    shape = tt_shape(50_000, 16, cores=3, rank=32)
    params, _ = cores_of(shape)
    gen = torch.Generator().manual_seed(2)
    uid = torch.unique(torch.cat([torch.randint(0, 2000, (3000,), generator=gen),
                                  torch.randint(0, 50_000, (3000,), generator=gen)]))
    w = torch.randn(len(uid), 16, generator=gen)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out = tt_rows(params, shape, uid, kernel="native")
            results.setdefault(threads, []).append([out, *torch.autograd.grad((out * w).sum(), params)])
    finally:
        torch.set_num_threads(before)
    (one,), (two, again) = results[1], results[2]
    for a, b, c in zip(one, two, again):
        assert torch.equal(b, c)
        assert rel_err(b, a) < 1e-6


def test_backend_native_equals_torch_kernels_and_trains():
    """Through TTEmbeddings (KJT in, fused stacked lookup, Adagrad on the cores): emb.kernel=native
    and emb.kernel=torch give the same outputs and the same cores after three steps."""
    tables = [TableSpec("t_A", 5000, 16, ("A",)), TableSpec("t_B", 900, 16, ("B1", "B2"))]
    built = {}
    for kernel in ("native", "torch"):
        torch.manual_seed(0)
        emb = TTEmbeddings(tables, emb_cfg(rank=8, **{"emb.kernel": kernel}), SPARSE_OPTIM, CPU)
        gen = torch.Generator().manual_seed(3)
        outs = []
        for _ in range(3):
            feats = kjt(["A", "B1", "B2"], [random_bags(5000, 64, 3, gen), random_bags(900, 64, 3, gen),
                                            random_bags(900, 64, 3, gen)])
            out = emb(feats).values()
            (out * out).sum().backward()
            emb.optimizers()[0].step()
            emb.optimizers()[0].zero_grad(set_to_none=True)
            outs.append(out.detach())
        built[kernel] = (outs, [p.detach().clone() for p in emb.parameters()])
        lookups = "our C kernels" if kernel == "native" else "PyTorch ops"
        assert f"TT lookups: {lookups} (" in emb.describe() and f"emb.kernel={kernel}" in emb.describe()
    for a, b in zip(built["native"][0], built["torch"][0]):
        assert rel_err(a, b) < 1e-5
    for a, b in zip(built["native"][1], built["torch"][1]):
        assert rel_err(a, b) < 1e-5


def test_kernel_choice_and_errors():
    cores = torch.zeros(3, 1, 2, 4)
    assert use_native("auto", cores)
    assert not use_native("torch", cores)
    assert not use_native("auto", cores.double())  # float64 (tests, references): PyTorch ops
    with pytest.raises(ConfigError, match="emb.kernel=native runs fp32 CPU cores, got torch.float64"):
        use_native("native", cores.double())
    with pytest.raises(ConfigError, match="emb.kernel='fast'"):
        use_native("fast", cores)
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=["emb=tt", "emb.kernel=fast"]).emb
    with pytest.raises(ConfigError, match="emb.kernel"):
        TTEmbeddings([TableSpec("t_A", 5000, 16, ("A",))], cfg, SPARSE_OPTIM, CPU)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty kernel cache, and library() forgetting the kernel it loaded."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tt_native.library.cache_clear()
    build._warn_once.cache_clear()
    yield tmp_path
    tt_native.library.cache_clear()
    build._warn_once.cache_clear()


def test_build_is_cached(fresh_build):
    tt_native.library()
    built = list((fresh_build / "cache" / "dlrm" / "kernels").glob("tt_chain-*.so"))
    assert len(built) == 1
    inode = built[0].stat().st_ino  # a rebuild would replace the file (a new inode)
    tt_native.library.cache_clear()
    tt_native.library()  # loads the cached file, no rebuild
    assert built[0].stat().st_ino == inode


def test_a_build_that_cannot_be_loaded_is_a_kernel_error(fresh_build, monkeypatch):
    """E.g. pruned by another version's build between the check and the load: auto then falls back
    (one warning), native fails in one line, as for a failed build."""
    tt_native.library()
    tt_native.library.cache_clear()

    def gone(path):
        raise OSError(f"{path}: cannot open shared object file")

    monkeypatch.setattr(build.ctypes, "CDLL", gone)
    with pytest.raises(NativeKernelError, match=r"^cannot load .*tt_chain-[0-9a-f]+\.so: .*cannot open shared object"):
        tt_native.library()


def test_a_new_build_prunes_all_but_the_newest_builds_of_its_source(fresh_build):
    cache = fresh_build / "cache" / "dlrm" / "kernels"
    cache.mkdir(parents=True)
    old = [cache / f"tt_chain-{i:016x}.so" for i in range(6)]  # earlier versions' builds
    other = cache / "tables-0000000000000000.so"  # another source's: not touched
    for i, p in enumerate([*old, other]):
        p.write_bytes(b"")
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    tt_native.library()
    new = [p for p in cache.glob("tt_chain-*.so") if p not in old]
    assert len(new) == 1 and other.exists()
    # the new build and the newest of the old ones: KEEP_BUILDS in all
    assert sorted(cache.glob("tt_chain-*.so")) == sorted([*new, *old[-(build.KEEP_BUILDS - 1) :]])


def test_no_compiler_auto_warns_once_and_runs_pytorch_native_raises(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-cc")
    shape = tt_shape(3000, 16, cores=3, rank=8)
    params, ref_params = cores_of(shape)
    uid = torch.arange(0, 3000, 7)
    with caplog.at_level(logging.WARNING, logger="dlrm.kernels.build"):
        out = tt_rows(params, shape, uid, kernel="auto")
        tt_rows(params, shape, uid, kernel="auto")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no C compiler ('no-such-cc' not on PATH" in warnings[0]
    check_against_reference(out, tt_rows_naive(ref_params, shape, uid), params, ref_params)
    with pytest.raises(ConfigError, match=r"emb.kernel=native: no C compiler .*; emb.kernel=torch \(or auto\) runs PyTorch ops"):
        tt_rows(params, shape, uid, kernel="native")


def test_compiler_error_is_one_line_naming_it(fresh_build, monkeypatch):
    cc = fresh_build / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'tt_chain.c:1: error: this compiler is broken' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(NativeKernelError, match=r"broken-cc failed to build tt_chain.c: tt_chain.c:1: error"):
        tt_native.library()
    assert not list((fresh_build / "cache" / "dlrm" / "kernels").glob("*.so"))  # nothing half-written


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("r, J", [(8, 16), (8, 4)])  # rows layout; cols layout (core transposed)
def test_level_backward_writes_every_core_slice(threads, r, J):
    """The core gradient comes uninitialized: the kernel zeroes the slices no prefix touched (before,
    between and after the touched digits, in each thread's range) and writes the others."""
    lib = tt_native.library()
    gen = torch.Generator().manual_seed(0)
    p, Q, n = 9, 2, 1200
    prev = torch.randn(40, Q, r, generator=gen)
    core = torch.randn(p, r, J, generator=gen)  # cols: read as [p, J, r]; same arithmetic below
    digit = torch.tensor([2, 3, 6])[torch.randint(0, 3, (n,), generator=gen)]
    src = torch.randint(0, 40, (n,), generator=gen)
    gout = torch.randn(n, Q, J, generator=gen)
    order = torch.argsort(digit, stable=True)
    gcore = torch.full_like(core, float("nan"))
    gprev = torch.zeros_like(prev)
    ptr = tt_native._ptr
    lib.tt_level_backward(ptr(prev), ptr(core), ptr(src), ptr(digit), ptr(order), n, p, Q, r, J,
                          ptr(gout), ptr(gprev), ptr(gcore), prev.shape[0], threads, 0, 0.0, 0.0, None)
    a, g = prev[src].double(), gout.double()
    if lib.tt_level_layout(r, J) == -1:  # core is [p, J, r]: gcore[d] += g^T a, gprev += g @ core[d]
        want = torch.zeros(p, J, r, dtype=torch.float64).index_add_(0, digit, g.transpose(1, 2) @ a)
        want_prev = torch.zeros_like(prev, dtype=torch.float64).index_add_(0, src, g @ core.view(p, J, r)[digit].double())
    else:
        want = torch.zeros(p, r, J, dtype=torch.float64).index_add_(0, digit, a.transpose(1, 2) @ g)
        want_prev = torch.zeros_like(prev, dtype=torch.float64).index_add_(0, src, g @ core[digit].double().transpose(1, 2))
    assert not gcore.isnan().any()
    assert torch.equal(gcore[[0, 1, 4, 5, 7, 8]], torch.zeros_like(gcore[[0, 1, 4, 5, 7, 8]]))
    assert rel_err(gcore.view_as(want), want) < 1e-5
    assert rel_err(gprev, want_prev) < 1e-5


def test_plan_equals_the_pytorch_prefixes_and_rejects_ids_beyond_the_factors():
    """One C pass gives the same distinct prefixes as tt_kernels._prefixes (PyTorch ops), for
    stacked tables of different row factors; a key past a table's factors, of a table that does not
    exist, or negative is an IndexError, never a read outside the cores."""
    from dlrm.embeddings.tt_kernels import _prefixes

    for cores in (2, 3, 4):
        shapes = [tt_shape(n, 16, cores=cores, rank=8) for n in (20_000, 3_000, 700)]
        gen = torch.Generator().manual_seed(cores)
        uids = [torch.unique(torch.randint(0, s.rows, (500,), generator=gen)) for s in shapes]
        table = torch.cat([torch.full((len(u),), t) for t, u in enumerate(uids)])
        local = torch.cat(uids)
        stride = max(s.padded_rows for s in shapes)
        digits, srcs = tt_native.plan(shapes, table * stride + local, stride)
        want_digits, parents = _prefixes(shapes, table, local)
        assert [d.tolist() for d in digits] == [d.tolist() for d in want_digits]
        assert srcs[0].tolist() == want_digits[0][parents[1]].tolist()
        assert [s.tolist() for s in srcs[1:]] == [p.tolist() for p in parents[2:]]
    shape = tt_shape(1000, 16, cores=3, rank=8)
    params, _ = cores_of(shape)
    for bad in (shape.padded_rows, -1):
        with pytest.raises(IndexError, match="outside their tables' row factors"):
            tt_rows(params, shape, torch.tensor([3, bad]).sort().values, kernel="native")
    with pytest.raises(IndexError):
        tt_native.plan([shape], torch.tensor([2 * shape.padded_rows + 1]), shape.padded_rows)


def test_fused_adagrad_state_is_stacked_and_survives_load_state_dict():
    """The update fused into backward reads Adagrad's `sum` stacked per core, each core's optimizer
    state a view of it; after load_state_dict (a resume) replaced those tensors, the next lookup
    stacks the loaded values again and steps the same as the run it was saved from."""
    tables = [TableSpec("t_A", 5000, 16, ("A",)), TableSpec("t_B", 900, 16, ("B",))]
    gen = torch.Generator().manual_seed(0)
    batches = [kjt(["A", "B"], [random_bags(5000, 32, 2, gen), random_bags(900, 32, 2, gen)]) for _ in range(3)]

    def build():
        torch.manual_seed(0)
        return TTEmbeddings(tables, emb_cfg(rank=8, **{"emb.kernel": "native"}), SPARSE_OPTIM, CPU)

    def step(emb, features):
        emb(features).values().square().sum().backward()
        emb.optimizers()[0].step()
        emb.optimizers()[0].zero_grad(set_to_none=True)

    straight = build()
    for b in batches:
        step(straight, b)
    first = build()
    step(first, batches[0])
    sums = first.stacked_states()
    state = first.optimizers()[0].state
    a1 = first.cores["t_A"][1]
    assert state[a1]["sum"].data_ptr() == sums[1].data_ptr() and float(sums[1].abs().sum()) > 0
    saved = ({k: v.clone() for k, v in first.state_dict().items()}, first.optimizers()[0].state_dict())
    resumed = build()
    resumed.stacked_states()  # stacked before the load replaces every state tensor
    resumed.load_state_dict(saved[0])
    resumed.optimizers()[0].load_state_dict(saved[1])
    for b in batches[1:]:
        step(resumed, b)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_unique_keys_equals_torch_unique_and_checks_ranges():
    """The batch's keys (table * stride + id), distinct and sorted, and each id's index among them,
    as torch.unique gives them; an id outside its table's rows raises, naming its position."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([10_000_000, 700, 93_000])
    table_of = torch.tensor([0, 1, 2, 1])  # feature 3 shares table 1
    counts = [3000, 2000, 0, 2500]
    ids = torch.cat([torch.randint(0, int(rows[t]), (c,), generator=gen) % (int(rows[t]) // (1 + 50 * (f % 2)))
                     for f, (t, c) in enumerate(zip(table_of.tolist(), counts))])
    stride = int(rows.max())
    keys, inverse = tt_native.unique_keys(ids, counts, table_of, rows, stride)
    table = torch.repeat_interleave(table_of, torch.tensor(counts))
    want_keys, want_inverse = torch.unique(table * stride + ids, sorted=True, return_inverse=True)
    assert torch.equal(keys, want_keys) and torch.equal(inverse, want_inverse)
    bad = ids.clone()
    bad[3000 + 17] = 700  # feature 1's table has 700 rows
    with pytest.raises(IndexError, match="TT id 700 at position 3017 is outside its table's rows"):
        tt_native.unique_keys(bad, counts, table_of, rows, stride)
    with pytest.raises(ValueError, match="do not add up"):
        tt_native.unique_keys(ids, [1, 2, 3, 4], table_of, rows, stride)
    empty = tt_native.unique_keys(ids[:0], [0, 0, 0, 0], table_of, rows, stride)
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def test_an_unwritable_kernel_cache_is_a_build_error_auto_runs_pytorch(fresh_build, monkeypatch):
    blocker = fresh_build / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # ~/.cache/dlrm/kernels cannot be made under a file
    with pytest.raises(NativeKernelError, match=r"cannot build tt_chain.c into .*not-a-dir/dlrm/kernels"):
        tt_native.library()
    assert not use_native("auto", torch.zeros(3, 1, 2, 4))


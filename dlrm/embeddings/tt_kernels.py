"""Tensor-train (TT-Rec) embedding math in plain PyTorch: shapes, init, lookup forward/backward.

A table of `rows` x `dim` is stored as `d` cores; core k has shape `[p_k, r_{k-1}, q_k, r_k]`
(r_0 = r_d = 1) so that one digit's slice is a contiguous `[r_{k-1}, q_k * r_k]` matrix. Row
`i` with mixed-radix digits `(i_1, ..., i_d)` (i = i_1 p_2..p_d + ... + i_d) is the chain product
`G_1[i_1] @ G_2[i_2] @ ... @ G_d[i_d]`, reshaped to `dim = q_1 * ... * q_d` entries.

Example::

    shape = tt_shape(rows=10_131_227, dim=16, cores=3, rank=32)   # p=(216,217,217) q=(2,2,4)
    cores = init_cores(shape)
    pooled = tt_embedding_bag(cores, shape, ids, offsets, "sum")  # [bags, 16]

The fast lookup (`tt_rows`) computes each distinct id once and shares the partial product of the
leading cores between ids with the same leading digits. Each later core then runs either in our
C kernels (tt_native.py: fp32 on CPU, `kernel="auto"|"native"`), which read every prefix's core
slice in place, digit by digit, or in PyTorch ops (tt_autograd.py: CUDA, float64, or
`kernel="torch"`) as batched GEMMs over chunks of prefixes grouped by digit instead of copying an
`r x q x r` slice per id. `tt_rows_multi` does the same for
several tables of equal ranks and dim factors in one lookup, their cores stacked (what `emb=tt`
runs). `tt_rows_naive` is the per-id gather it replaces (kept as the reference for tests and
the benchmark).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations_with_replacement

import torch

from dlrm.embeddings.tt_autograd import TTRows, plan_levels
from dlrm.embeddings.tt_native import CoreUpdate, TTRowsNative, plan, use_native

MAX_PADDING = 0.15  # automatic row factoring pads rows up by at most this fraction


@dataclass(frozen=True)
class TTShape:
    """Factorization of one table: `prod(row_factors) >= rows`, `prod(dim_factors) == dim`.

    Example: ``TTShape(100, (4, 5, 5), (2, 2, 4), (1, 8, 8, 1)).num_params == 1088``.
    """

    rows: int
    row_factors: tuple[int, ...]
    dim_factors: tuple[int, ...]
    ranks: tuple[int, ...]  # r_0 = 1, r_1 .. r_{d-1}, r_d = 1

    @property
    def cores(self) -> int:
        return len(self.row_factors)

    @property
    def dim(self) -> int:
        return math.prod(self.dim_factors)

    @property
    def padded_rows(self) -> int:
        return math.prod(self.row_factors)

    @property
    def padding(self) -> float:
        """Fraction of virtual rows beyond `rows` (never looked up: ids are range-checked)."""
        return self.padded_rows / self.rows - 1

    @property
    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        r, p, q = self.ranks, self.row_factors, self.dim_factors
        return [(p[k], r[k], q[k], r[k + 1]) for k in range(self.cores)]

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.core_shapes)

    def __str__(self) -> str:
        return (
            f"rows {list(self.row_factors)} (+{100 * self.padding:.1f}% pad) "
            f"dims {list(self.dim_factors)} ranks {list(self.ranks)}"
        )


def factor_rows(rows: int, cores: int, max_padding: float = MAX_PADDING) -> tuple[int, ...]:
    """Ascending factors with product in [rows, rows * (1 + max_padding)], as balanced as possible.

    Balance = smallest sum of factors (for a given product the sum is least when the factors are
    equal, and core memory grows with each factor), then smallest max/min, then least padding.
    The largest factor goes last, so as many ids as possible share leading digits (and hence
    partial products).
    Example: ``factor_rows(10_131_227, 3) == (216, 217, 217)`` (0.4% padding).
    """
    if rows < 1 or cores < 1:
        raise ValueError(f"cannot factor {rows} rows into {cores} cores")
    limit = math.floor(rows * (1 + max_padding))
    best: tuple[int, float, int, tuple[int, ...]] | None = None
    # The smallest factor is at most the d-th root of the limit; the other d-1 factors are at least
    # it, and the last one is then forced (ceil of what is left). Walk the smallest factor down
    # from the root and stop once even a perfectly balanced rest cannot beat the best sum.
    top = int(round(limit ** (1 / cores))) + 1
    for low in range(top, 0, -1):
        if low**cores > limit:
            continue
        if best is not None and cores > 1:
            if low + (cores - 1) * (rows / low) ** (1 / (cores - 1)) > best[0] + 1:
                break
        for cand in _balanced_completions(rows, limit, cores, low):
            key = (sum(cand), cand[-1] / cand[0], math.prod(cand), cand)
            if best is None or key < best:
                best = key
    if best is None:  # cannot happen (rows itself pads 0%), kept for the type checker
        raise ValueError(f"cannot factor {rows} rows into {cores} cores")
    return best[-1]


def _balanced_completions(rows: int, limit: int, cores: int, low: int):
    """Ascending tuples starting with `low` whose product lands in [rows, limit]."""
    if cores == 1:
        if rows <= low <= limit:
            yield (low,)
        return
    # middle factors range over [low, hi]; the last one is forced.
    hi = math.ceil((limit / low) ** (1 / (cores - 1))) + 1
    for mid in combinations_with_replacement(range(low, hi + 1), cores - 2):
        head = low * math.prod(mid)
        last = max(-(-rows // head), mid[-1] if mid else low)
        if head * last <= limit:
            yield (low, *mid, last)


def factor_dim(dim: int, cores: int) -> tuple[int, ...]:
    """Exact ascending factors of `dim`, balanced: 16 -> (2, 2, 4), 64 -> (4, 4, 4)."""

    def splits(n: int, k: int, low: int):
        if k == 1:
            if n >= low:
                yield (n,)
            return
        for f in range(low, n + 1):
            if n % f == 0:
                for rest in splits(n // f, k - 1, f):
                    yield (f, *rest)

    return min(splits(dim, cores, 1), key=lambda c: (c[-1] / c[0], c))


def tt_shape(
    rows: int,
    dim: int,
    cores: int = 3,
    rank: int = 32,
    ranks: list[int] | tuple[int, ...] | None = None,
    row_factors: list[int] | tuple[int, ...] | None = None,
    dim_factors: list[int] | tuple[int, ...] | None = None,
    name: str = "table",
) -> TTShape:
    """Validated TT shape for a table; explicit factors/ranks override the automatic ones.

    Example: ``tt_shape(1000, 16, cores=2, rank=4)`` -> rows (32, 32), dims (4, 4), ranks (1, 4, 1).
    """
    if row_factors is not None:
        cores = len(row_factors)
    elif dim_factors is not None:
        cores = len(dim_factors)
    if not 2 <= cores <= 4:
        raise ValueError(f"{name}: TT cores must be 2, 3 or 4, got {cores}")
    p = tuple(int(x) for x in row_factors) if row_factors is not None else factor_rows(rows, cores)
    q = tuple(int(x) for x in dim_factors) if dim_factors is not None else factor_dim(dim, cores)
    inner = [int(x) for x in ranks] if ranks is not None else [int(rank)] * (cores - 1)
    if len(p) != cores or len(q) != cores or len(inner) != cores - 1:
        raise ValueError(
            f"{name}: {cores} cores need {cores} row factors, {cores} dim factors and "
            f"{cores - 1} ranks, got {list(p)}, {list(q)}, {inner}"
        )
    if min(p + q) < 1 or min(inner) < 1:
        raise ValueError(f"{name}: factors and ranks must be >= 1, got {list(p)} {list(q)} {inner}")
    if math.prod(p) < rows:
        raise ValueError(f"{name}: row factors {list(p)} cover {math.prod(p)} < {rows} rows")
    if math.prod(q) != dim:
        raise ValueError(f"{name}: dim factors {list(q)} multiply to {math.prod(q)}, not dim {dim}")
    return TTShape(rows, p, q, (1, *inner, 1))


def init_cores(
    shape: TTShape,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Gaussian cores whose reconstructed table has variance 1/(3 rows), like U(+-1/sqrt(rows)).

    An entry of the table is a sum of prod(r_1..r_{d-1}) products of d independent entries, so
    its variance is prod(r) * s^(2d): s = (1 / (3 rows prod(r)))^(1/(2d)) (TT-Rec's recipe;
    for 3 cores (1/(3 n r1 r2))^(1/6)).
    """
    s = (1.0 / (3 * shape.rows * math.prod(shape.ranks))) ** (1 / (2 * shape.cores))
    return [
        torch.randn(cs, generator=generator, dtype=dtype, device=device) * s
        for cs in shape.core_shapes
    ]


def digits_of(ids: torch.Tensor, shape: TTShape) -> list[torch.Tensor]:
    """Mixed-radix digits (i_1, ..., i_d) of `ids` (most significant first)."""
    out, rest = [], ids
    for p in reversed(shape.row_factors[1:]):
        out.append(rest % p)
        rest = rest // p
    out.append(rest)
    return out[::-1]


def materialize(cores: list[torch.Tensor], shape: TTShape) -> torch.Tensor:
    """The full `[rows, dim]` table the cores represent (for tests and small tables only)."""
    p0, _, q0, r1 = shape.core_shapes[0]
    full = cores[0].reshape(p0, q0, r1)  # [P, Q, r]
    for core in cores[1:]:
        P, Q, _ = full.shape
        p, _, q, r = core.shape
        full = torch.einsum("PQa,paqb->PpQqb", full, core).reshape(P * p, Q * q, r)
    return full[: shape.rows].reshape(shape.rows, shape.dim)


def tt_rows_naive(cores: list[torch.Tensor], shape: TTShape, ids: torch.Tensor) -> torch.Tensor:
    """Rows of `ids` by gathering every core slice per lookup (no dedup): the slow baseline.

    Each lookup copies its `r_{k-1} x q_k r_k` slice of every core and runs its own chain of
    tiny matmuls; autograd differentiates it. What TT-Rec's original kernel does per id.
    """
    digits = digits_of(ids, shape)
    n = ids.numel()
    p0, _, q0, r1 = shape.core_shapes[0]
    out = cores[0].reshape(p0, q0, r1)[digits[0]]  # [n, Q, r]
    for core, dig in zip(cores[1:], digits[1:]):
        p, r, q, r2 = core.shape
        out = torch.bmm(out, core.reshape(p, r, q * r2)[dig]).reshape(n, -1, r2)
    return out.reshape(n, shape.dim)


def _prefixes(
    shapes: list[TTShape], table: torch.Tensor | None, local: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Digits and parents of the distinct id prefixes, for `plan_levels`.

    `(table, local)` pairs are distinct and sorted (table first). Level k's prefixes are the
    distinct `(table, first k + 1 digits)`; `digits[k]` is each one's row in core k with the
    tables' cores stacked (table t's digits offset by the row factors of tables 0..t-1).
    """
    d = shapes[0].cores
    digits: list[torch.Tensor] = [local] * d
    parents: list[torch.Tensor | None] = [None] * d
    codes = local
    if table is None:  # one table: the same radix for every id
        p = shapes[0].row_factors
        for k in range(d - 1, 0, -1):
            digits[k] = codes % p[k]
            # codes are sorted, so prefixes are too: unique_consecutive needs no sort.
            codes, parents[k] = torch.unique_consecutive(codes // p[k], return_inverse=True)
        digits[0] = codes
        return digits, parents
    factors = torch.tensor([s.row_factors for s in shapes], device=local.device)  # [T, d]
    offsets = torch.cumsum(factors, 0) - factors  # [T, d]: where table t's rows start in core k
    stride = max(s.padded_rows for s in shapes)  # key = table * stride + prefix: sorted, distinct
    for k in range(d - 1, 0, -1):
        p = factors[:, k].index_select(0, table)
        digits[k] = codes % p + offsets[:, k].index_select(0, table)
        keys, parents[k] = torch.unique_consecutive(table * stride + codes // p, return_inverse=True)
        table, codes = keys // stride, keys % stride
    digits[0] = codes + offsets[:, 0].index_select(0, table)
    return digits, parents


def tt_rows_multi(
    cores: list[list[torch.Tensor]],
    shapes: list[TTShape],
    table: torch.Tensor | None,
    local: torch.Tensor,
    method: str = "auto",
    stacked: list[torch.Tensor] | None = None,
    kernel: str = "auto",
    update: CoreUpdate | None = None,
) -> torch.Tensor:
    """Rows `[n, dim]` of the distinct `(table[i], local[i])` pairs, sorted by table then id, in
    range, from several tables in ONE lookup (differentiable in every table's cores).

    The tables must share cores, dim factors and ranks (row factors may differ): their cores are
    stacked along the row-factor axis and the plan, GEMMs and scatters run once for all of them
    instead of ~40 small ops per table. `table=None`: every id is in `shapes[0]`'s table.
    `stacked`: the tables' cores already stacked, each table's core a view of its rows there
    (TTEmbeddings keeps them so); without it they are concatenated here, a copy per call.
    `kernel`: emb.kernel, C kernels or PyTorch ops (tt_native.use_native); `method` picks among
    the PyTorch path's layouts. `update`: on the C path, the optimizer step fused into backward
    (tt_native.CoreUpdate; the cores it steps get no gradient); the PyTorch path ignores it.

    Raises:
        ValueError: the shapes differ in cores, dim factors or ranks.
        ConfigError: `kernel="native"` where the C kernel cannot run (names emb.kernel).
    """
    first = shapes[0]
    if any((s.dim_factors, s.ranks) != (first.dim_factors, first.ranks) for s in shapes):
        raise ValueError(f"tt_rows_multi: tables differ in dim factors or ranks: {[str(s) for s in shapes]}")
    if local.numel() == 0:
        return cores[0][0].new_zeros(0, first.dim)
    if use_native(kernel, cores[0][0]):
        stride = max(s.padded_rows for s in shapes)
        keys = local if table is None else table * stride + local
        return tt_rows_from_keys(cores, shapes, keys, stride, stacked, update)
    joint, stacked_arg, params = _joint(cores, shapes, stacked)
    levels = plan_levels(*_prefixes(shapes, table, local), joint.core_shapes, joint.dim_factors, method)
    return TTRows.apply(levels, joint, stacked_arg, *params)


def tt_rows_from_keys(
    cores: list[list[torch.Tensor]],
    shapes: list[TTShape],
    keys: torch.Tensor,
    stride: int,
    stacked: list[torch.Tensor] | None = None,
    update: CoreUpdate | None = None,
) -> torch.Tensor:
    """`tt_rows_multi` on the C kernels, the ids given as sorted distinct keys `table * stride + id`
    ([n] int64, fp32 CPU cores; what TTEmbeddings hands over from tt_native.unique_keys).

    Raises IndexError for a key beyond its table's row factors."""
    if keys.numel() == 0:
        return cores[0][0].new_zeros(0, shapes[0].dim)
    joint, stacked_arg, params = _joint(cores, shapes, stacked)
    return TTRowsNative.apply(*plan(shapes, keys, stride), joint, stacked_arg, update, *params)


def _joint(cores, shapes, stacked):
    """(shape, stacked, params) for TTRows/TTRowsNative: one table's cores as they are; several
    tables' stacked ones with each table's cores as views (`stacked`), or else concatenated here
    (a copy per call)."""
    first = shapes[0]
    if len(shapes) == 1:
        return first, None, list(cores[0])
    joint = joint_shape(shapes)
    if stacked is None:
        return joint, None, [torch.cat([c[k] for c in cores]) for k in range(first.cores)]
    return joint, list(stacked), [c for t in cores for c in t]


def joint_shape(shapes: list[TTShape]) -> TTShape:
    """The shape of several tables' cores stacked along the row-factor axis (equal ranks and dim
    factors): row factors summed per core, rows = the sum of the tables' padded rows."""
    first = shapes[0]
    factors = tuple(sum(s.row_factors[k] for s in shapes) for k in range(first.cores))
    return TTShape(sum(s.padded_rows for s in shapes), factors, first.dim_factors, first.ranks)


def tt_rows(
    cores: list[torch.Tensor],
    shape: TTShape,
    uid: torch.Tensor,
    method: str = "auto",
    kernel: str = "auto",
) -> torch.Tensor:
    """Rows `[len(uid), dim]` of sorted, distinct, in-range ids `uid` (differentiable in cores).

    `kernel`: "auto" (the C kernels on CPU where they build), "native" or "torch" (tt_native);
    `method`: the PyTorch path's layout, "auto" (per core, see tt_autograd.plan_levels),
    "grouped" or "gather" (to benchmark the choices).
    """
    return tt_rows_multi([cores], [shape], None, uid, method, kernel=kernel)


def pool(
    rows: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, mode: str = "sum"
) -> torch.Tensor:
    """Bags `[len(offsets) - 1, D]`: bag b pools `rows[index[offsets[b]:offsets[b + 1]]]`.

    Single-hot batches are a plain gather. Multi-hot ones are a segment sum by index_add_, whose
    backward (a gather) and index_select's backward (an index_add_) need no sort, unlike
    embedding_bag's backward.
    """
    bags = offsets.numel() - 1
    picked = rows.index_select(0, index)
    lengths = offsets[1:] - offsets[:-1]
    if index.numel() == bags and bool((lengths == 1).all()):
        return picked
    bag = torch.repeat_interleave(torch.arange(bags, device=index.device), lengths)
    pooled = rows.new_zeros(bags, rows.shape[1]).index_add_(0, bag, picked)
    if mode == "mean":
        pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(rows.dtype)
    elif mode != "sum":
        raise ValueError(f"pooling={mode!r}: choose sum or mean")
    return pooled


def tt_embedding_bag(
    cores: list[torch.Tensor],
    shape: TTShape,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    mode: str = "sum",
    method: str = "auto",
    kernel: str = "auto",
) -> torch.Tensor:
    """Pooled bags `[len(offsets) - 1, dim]`; `offsets` has the final end (KJT offsets).
    `kernel`, `method`: as in `tt_rows`.

    Ids must be in [0, shape.rows) (checked by the caller, who knows the feature's name).
    Example: ``tt_embedding_bag(cores, shape, torch.tensor([3, 5, 3]), torch.tensor([0, 2, 3]))``.
    """
    uid, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return pool(tt_rows(cores, shape, uid, method, kernel), inverse, offsets, mode)

"""Tensor-train (TT-Rec) embedding math in plain PyTorch: shapes, init, lookup forward/backward.

A table of `rows` x `dim` is stored as `d` cores; core k has shape `[p_k, r_{k-1}, q_k, r_k]`
(r_0 = r_d = 1) so that one digit's slice is a contiguous `[r_{k-1}, q_k * r_k]` matrix. Row
`i` with mixed-radix digits `(i_1, ..., i_d)` (i = i_1 p_2..p_d + ... + i_d) is the chain product
`G_1[i_1] @ G_2[i_2] @ ... @ G_d[i_d]`, reshaped to `dim = q_1 * ... * q_d` entries.

Example::

    shape = tt_shape(rows=10_131_227, dim=16, cores=3, rank=32)   # p=(216,217,217) q=(2,2,4)
    cores = init_cores(shape)
    pooled = tt_embedding_bag(cores, shape, ids, offsets, "sum")  # [bags, 16]

The fast lookup (`tt_rows`) computes each distinct id once, shares the partial product of the
leading cores between ids with the same leading digits, and runs the big middle core as one
batched GEMM per digit group instead of copying an `r x q x r` slice per id. `tt_rows_naive`
is the per-id gather it replaces (kept as the reference for tests and the benchmark).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations_with_replacement

import torch

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


# ---------------------------------------------------------------------------------------------
# Fast path: distinct ids, shared prefixes, grouped middle cores.
#
# Level k (0-based) holds the partial products of the distinct length-(k+1) id prefixes in a
# "store" addressed by slot. Level 0's store is core 0 itself (slot = digit). Level k >= 1 takes
# A = store_{k-1}[src] (one [Q, r] matrix per distinct prefix, Q = q_0...q_{k-1}) and multiplies
# it by its digit's core slice, either
#   - "gather": copy each prefix's slice and bmm (cheap when slices are small, e.g. the last core
#     with r_d = 1), store = [n_k, Q q_k, r_k], slot = identity; or
#   - "grouped": lay the A's out in a zero-padded [p_k, m, Q, r] buffer grouped by digit (m = the
#     largest group) and run ONE bmm against the core as it is ([p_k, r, q r']): no slice copies,
#     GEMMs with m*Q rows instead of Q, and the core's gradient comes out of one bmm, dense.
# Every store ends in a zero row, the parent of the grouped buffer's empty slots. All gathers are
# index_select (6x faster than advanced indexing on CPU for these shapes) and all scatters are
# index_add_ (no sort, unlike index_put_ with accumulate).
# ---------------------------------------------------------------------------------------------


@dataclass
class _Level:
    src: torch.Tensor  # gather: per prefix, its parent's row in the previous store
    digit: torch.Tensor  # gather: per prefix, its digit at this level
    grouped: bool
    groups: int = 0  # grouped: m, slots per digit
    slot: torch.Tensor | None = None  # grouped: per prefix, its slot (row) in this store
    slot_src: torch.Tensor | None = None  # grouped: per slot, parent's row (len(prev) = zero row)


def _plan(shape: TTShape, uid: torch.Tensor, method: str) -> list[_Level]:
    """Index structure for sorted distinct ids `uid`: one _Level per core after the first."""
    p = shape.row_factors
    d = shape.cores
    codes: list[torch.Tensor] = [uid] * d  # distinct prefix codes per level, sorted
    parents: list[torch.Tensor] = [uid] * d
    for k in range(d - 1, 0, -1):
        # uid is sorted, so prefixes are sorted too: unique_consecutive needs no sort.
        codes[k - 1], parents[k] = torch.unique_consecutive(codes[k] // p[k], return_inverse=True)
    slot, store_rows = codes[0], p[0]  # level 0: the store is core 0, addressed by digit
    levels = []
    for k in range(1, d):
        src = slot.index_select(0, parents[k]) if slot is not None else parents[k]
        digit = codes[k] % p[k]
        n = digit.numel()
        _, r, q, r2 = shape.core_shapes[k]
        Q = math.prod(shape.dim_factors[:k])
        count = torch.bincount(digit, minlength=p[k])
        groups = int(count.max())
        grouped = method == "grouped"
        if method == "auto":
            # Grouped runs p_k batched GEMMs over m*p_k padded slots; gather copies an r*q*r'
            # slice per prefix and runs n tiny GEMMs (~0.2 us of overhead each on CPU). Grouped
            # wins unless padding is extreme (few ids spread over many digits): measured 1.5-3x
            # faster on the middle core and 1.1-1.6x on the last one for 2048 Zipf ids.
            grouped = groups * p[k] <= 4 * n or groups * p[k] * Q * (r + q * r2) < n * r * q * r2
        if grouped:
            order = torch.argsort(digit, stable=True)
            start = torch.cumsum(count, 0) - count
            rank_in_group = torch.empty_like(order)
            rank_in_group[order] = torch.arange(n, device=uid.device) - start[digit[order]]
            slot = digit * groups + rank_in_group
            slot_src = torch.full((p[k] * groups,), store_rows, dtype=src.dtype, device=src.device)
            slot_src.index_copy_(0, slot, src)
            levels.append(_Level(src, digit, True, groups, slot, slot_src))
            store_rows = p[k] * groups
        else:
            levels.append(_Level(src, digit, False))
            slot, store_rows = None, n
    return levels


class _TTRows(torch.autograd.Function):
    """Rows of distinct ids from cores; backward writes dense core-shaped gradients."""

    @staticmethod
    def forward(ctx, levels: list[_Level], shape: TTShape, *cores):
        p0, _, q0, r1 = shape.core_shapes[0]
        # Every store ends with one zero row: the parent of the grouped buffer's empty slots.
        store = cores[0].reshape(p0, q0, r1)
        if levels[0].grouped:
            store = torch.cat([store, store.new_zeros(1, q0, r1)])
        saved = []
        for lv, core in zip(levels, cores[1:]):
            p, r, q, r2 = core.shape
            slices = core.reshape(p, r, q * r2)
            if lv.grouped:
                x = store.index_select(0, lv.slot_src)  # [p m, Q, r], zero rows for empty slots
                Q = x.shape[1]
                x = x.reshape(p, lv.groups * Q, r)
                out, store = _store(x, p, p * lv.groups, Q, q, r2)
                if _transposed(lv, Q, q * r2):  # y^T = G^T x^T: a wide GEMM instead of N = q r'
                    out.copy_(torch.bmm(slices.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2))
                else:
                    torch.bmm(x, slices, out=out)  # [p, m Q, q r']
                saved.append(x)
            else:
                a = store.index_select(0, lv.src)  # [n, Q, r]
                b = slices.index_select(0, lv.digit)  # [n, r, q r']
                n, Q, _ = a.shape
                out, store = _store(a, n, n, Q, q, r2)
                torch.bmm(a, b, out=out)
                saved.append((a, b))
        rows = store.reshape(store.shape[0], shape.dim)
        if levels[-1].grouped:
            rows = rows.index_select(0, levels[-1].slot)
        else:
            rows = rows[:-1]
        ctx.levels, ctx.shape, ctx.saved = levels, shape, saved
        ctx.save_for_backward(*cores)
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        cores = ctx.saved_tensors
        levels, shape, saved = ctx.levels, ctx.shape, ctx.saved
        grads: list[torch.Tensor] = [g_rows] * len(cores)
        g = g_rows  # gradient of the current store, row by row
        last = levels[-1]
        if last.grouped:
            rows = cores[-1].shape[0] * last.groups
            g = g_rows.new_zeros(rows, shape.dim).index_add_(0, last.slot, g_rows)
        for k in range(len(cores) - 1, 0, -1):
            lv, core = levels[k - 1], cores[k]
            p, r, q, r2 = core.shape
            prev_rows = cores[0].shape[0] if k == 1 else _store_rows(levels[k - 2], saved[k - 2])
            if lv.grouped:
                x = saved[k - 1]  # [p, m Q, r]
                gy = g.reshape(p, -1, q * r2)  # [p, m Q, q r']
                if _transposed(lv, x.shape[1] // lv.groups, q * r2):
                    grads[k] = torch.bmm(gy.transpose(1, 2), x).transpose(1, 2).reshape(core.shape)
                else:
                    grads[k] = torch.bmm(x.transpose(1, 2), gy).reshape(core.shape)
                gx = torch.bmm(gy, core.reshape(p, r, q * r2).transpose(1, 2))  # [p, m Q, r]
                gx = gx.reshape(p * lv.groups, -1)
                g = gx.new_zeros(prev_rows + 1, gx.shape[1]).index_add_(0, lv.slot_src, gx)
                g = g[:prev_rows]
            else:
                a, b = saved[k - 1]
                n, Q, _ = a.shape
                gy = g.reshape(n, Q, q * r2)
                if r2 == 1:  # last core: [q, r] = gy^T a is 2x faster than a^T gy, then transpose
                    gb = torch.bmm(gy.transpose(1, 2), a).transpose(1, 2)  # [n, r, q]
                else:
                    gb = torch.bmm(a.transpose(1, 2), gy)  # [n, r, q r']
                grads[k] = core.new_zeros(p, r * q * r2).index_add_(0, lv.digit, gb.reshape(n, -1))
                grads[k] = grads[k].reshape(core.shape)
                ga = torch.bmm(gy, b.transpose(1, 2)).reshape(n, Q * r)  # [n, Q r]
                g = ga.new_zeros(prev_rows, Q * r).index_add_(0, lv.src, ga)
        grads[0] = g.reshape(cores[0].shape)
        return (None, None, *grads)


def _store(
    like: torch.Tensor, batch: int, rows: int, Q: int, q: int, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows + 1, Q q, r] store whose last row is zero, and its first rows as a bmm output
    [batch, rows * Q / batch, q r].

    Writing the bmm into it (out=) saves concatenating a zero row afterwards (a 1.3 MB copy for
    the middle core's products at rank 32).
    """
    buf = like.new_empty((rows + 1) * Q * q * r)
    buf[rows * Q * q * r :].zero_()
    out = buf[: rows * Q * q * r].view(batch, -1, q * r)
    return out, buf.view(rows + 1, Q * q, r)


def _transposed(lv: _Level, Q: int, width: int) -> bool:
    """Run a grouped core's GEMMs transposed when its slices are narrower than the group.

    MKL's small GEMMs are slow with few output columns: for the last core (q r' = 4 at D = 16)
    core^T @ x^T measured 1.3-1.9x faster than x @ core on one thread.
    """
    return width < lv.groups * Q


def _store_rows(lv: _Level, saved) -> int:
    return saved.shape[0] * lv.groups if lv.grouped else saved[0].shape[0]


def tt_rows(
    cores: list[torch.Tensor], shape: TTShape, uid: torch.Tensor, method: str = "auto"
) -> torch.Tensor:
    """Rows `[len(uid), dim]` of sorted, distinct, in-range ids `uid` (differentiable in cores).

    `method`: "auto" (per core, see _plan), "grouped" or "gather" (to benchmark the choices).
    """
    if uid.numel() == 0:
        return cores[0].new_zeros(0, shape.dim)
    return _TTRows.apply(_plan(shape, uid, method), shape, *cores)


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
) -> torch.Tensor:
    """Pooled bags `[len(offsets) - 1, dim]`; `offsets` has the final end (KJT offsets).

    Ids must be in [0, shape.rows) (checked by the caller, who knows the feature's name).
    Example: ``tt_embedding_bag(cores, shape, torch.tensor([3, 5, 3]), torch.tensor([0, 2, 3]))``.
    """
    uid, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return pool(tt_rows(cores, shape, uid, method), inverse, offsets, mode)

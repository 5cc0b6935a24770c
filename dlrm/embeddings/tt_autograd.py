"""The fast TT lookup's kernels: the index plan, and forward/backward as one autograd.Function.

Used through `dlrm.embeddings.tt_kernels.tt_rows` / `tt_rows_multi`, which compute the digits and
prefix parents this plan starts from. The cores handed to `TTRows` may be one table's, or several
tables' cores of equal ranks and dim factors stacked along their row-factor axis (one lookup for
all of them: `tt_rows_multi`); the kernels do not tell the two apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dlrm.embeddings.tt_kernels import TTShape

# ---------------------------------------------------------------------------------------------
# Fast path: distinct ids, shared prefixes, grouped middle cores.
#
# Level k (0-based) holds the partial products of the distinct length-(k+1) id prefixes in a
# "store" addressed by slot. Level 0's store is core 0 itself (slot = digit). Level k >= 1 takes
# A = store_{k-1}[src] (one [Q, r] matrix per distinct prefix, Q = q_0...q_{k-1}) and multiplies
# it by its digit's core slice, either
#   - "gather": copy each prefix's slice and bmm (cheap when slices are small, e.g. the last core
#     with r_d = 1), store = [n_k, Q q_k, r_k], slot = identity; or
#   - "grouped": lay the A's out in a zero-padded buffer of chunks of c prefixes grouped by digit:
#     chunk d (d < p_k) holds digit d's first c prefixes and runs against the core as it is
#     ([p_k, r, q r'], no copy), digits with more than c prefixes spill into E overflow chunks
#     that run against copies of their digit's slice. Two bmms with c*Q rows per GEMM instead of
#     Q; the core's gradient is one bmm (dense) plus an index_add_ of the E overflow slices.
#     c is chosen per level from the group sizes (`_chunk`): c = the largest group means no
#     overflow (the layout before), which pads everything to the hottest digit when tables of
#     different sizes share one stacked core.
# Every store ends in a zero row, the parent of the grouped buffer's empty slots. All gathers are
# index_select (6x faster than advanced indexing on CPU for these shapes) and all scatters are
# index_add_ (no sort, unlike index_put_ with accumulate).
# ---------------------------------------------------------------------------------------------


@dataclass
class _Level:
    src: torch.Tensor  # gather: per prefix, its parent's row in the previous store
    digit: torch.Tensor  # gather: per prefix, its digit at this level
    grouped: bool
    groups: int = 0  # grouped: c, slots per chunk
    slot: torch.Tensor | None = None  # grouped: per prefix, its slot (row) in this store
    slot_src: torch.Tensor | None = None  # grouped: per slot, parent's row (len(prev) = zero row)
    extra: torch.Tensor | None = None  # grouped: [E] digit of each overflow chunk (None: E = 0)


def plan_levels(
    digits: list[torch.Tensor],
    parents: list[torch.Tensor | None],
    core_shapes: list[tuple[int, int, int, int]],
    dim_factors: tuple[int, ...],
    method: str,
    chunk: int | None = None,
) -> list[_Level]:
    """Index structure of one lookup: one _Level per core after the first.

    `digits[k]` ([n_k] int64): per distinct length-(k+1) prefix, its row in core k (core k has
    `core_shapes[k][0]` rows: one table's digits, or several tables' cores stacked, offset);
    `parents[k]` ([n_k], k >= 1): its length-k prefix's index in level k-1 (prefixes sorted, so
    nondecreasing). `method`: "auto", "grouped" or "gather" (see the comment above); `chunk`
    fixes the grouped chunk size c (tests), else `_chunk` picks it.
    """
    slot, store_rows = digits[0], core_shapes[0][0]  # level 0: the store is core 0, addressed by digit
    levels = []
    for k in range(1, len(core_shapes)):
        src = slot.index_select(0, parents[k]) if slot is not None else parents[k]
        digit = digits[k]
        n = digit.numel()
        p, r, q, r2 = core_shapes[k]
        Q = math.prod(dim_factors[:k])
        count = torch.bincount(digit, minlength=p)
        c = chunk or _chunk(count)
        spill = ((count + c - 1) // c - 1).clamp(min=0)  # overflow chunks per digit
        extra_chunks = int(spill.sum())
        slots = (p + extra_chunks) * c
        grouped = method == "grouped"
        if method == "auto":
            # Grouped runs batched GEMMs over `slots` padded slots; gather copies an r*q*r'
            # slice per prefix and runs n tiny GEMMs (~0.2 us of overhead each on CPU). Grouped
            # wins unless padding is extreme (few ids spread over many digits): measured 1.5-3x
            # faster on the middle core and 1.1-1.6x on the last one for 2048 Zipf ids.
            grouped = slots <= 4 * n or slots * Q * (r + q * r2) < n * r * q * r2
        if grouped:
            order = torch.argsort(digit, stable=True)
            start = torch.cumsum(count, 0) - count
            rank = torch.empty_like(order)
            rank[order] = torch.arange(n, device=digit.device) - start[digit[order]]
            chunk_no = torch.div(rank, c, rounding_mode="floor")
            spill_base = torch.cumsum(spill, 0) - spill + p  # first overflow chunk of each digit
            at = torch.where(chunk_no == 0, digit, spill_base.index_select(0, digit) + chunk_no - 1)
            slot = at * c + rank % c
            slot_src = torch.full((slots,), store_rows, dtype=src.dtype, device=src.device)
            slot_src.index_copy_(0, slot, src)
            extra = None
            if extra_chunks:
                extra = torch.repeat_interleave(torch.arange(p, device=digit.device), spill)
            levels.append(_Level(src, digit, True, c, slot, slot_src, extra))
            store_rows = slots
        else:
            levels.append(_Level(src, digit, False))
            slot, store_rows = None, n
    return levels


class TTRows(torch.autograd.Function):
    """Rows of distinct ids from cores; backward writes dense core-shaped gradients.

    `apply(levels, shape, stacked, *cores)`: `levels` from `plan_levels`; `shape` gives
    `core_shapes[0]` and `dim` (a TTShape, or the joint shape of stacked tables); returns `[n, dim]`
    rows in the order of the last level's prefixes (the distinct ids, sorted). `stacked=None`:
    `cores` are the d cores the math runs on. Else `stacked` is those d cores (several tables'
    cores stacked along the row-factor axis, not requiring grad) and `cores` are the tables'
    own cores, table-major (table 0's d cores, then table 1's, ...), each the slice of `stacked`
    it aliases (TTEmbeddings keeps them so): the math reads `stacked`, no copy, and each table's
    gradient is its slice of the stacked gradient."""

    @staticmethod
    def forward(ctx, levels: list[_Level], shape: TTShape, stacked, *params):
        cores = params if stacked is None else stacked
        ctx.param_rows = [p.shape[0] for p in params] if stacked is not None else None
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
                x = store.index_select(0, lv.slot_src)  # [(p + E) c, Q, r], zero rows for empty slots
                Q = x.shape[1]
                chunks = x.shape[0] // lv.groups
                x = x.reshape(chunks, lv.groups * Q, r)
                out, store = _store(x, chunks, chunks * lv.groups, Q, q, r2)
                spilled = slices.index_select(0, lv.extra) if lv.extra is not None else None
                torch.bmm(x[:p], slices, out=out[:p])  # [p, c Q, q r']
                if spilled is not None:
                    torch.bmm(x[p:], spilled, out=out[p:])  # [E, c Q, q r']
                saved.append((x, spilled))
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
        if stacked is None:
            ctx.save_for_backward(*cores)
        else:  # read in backward before any optimizer step, like saved tensors
            ctx.stacked = stacked
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        cores = ctx.saved_tensors if ctx.param_rows is None else ctx.stacked
        levels, shape, saved = ctx.levels, ctx.shape, ctx.saved
        grads: list[torch.Tensor] = [g_rows] * len(cores)
        g = g_rows  # gradient of the current store, row by row
        last = levels[-1]
        if last.grouped:
            rows = _store_rows(last, saved[-1])
            g = g_rows.new_zeros(rows, shape.dim).index_add_(0, last.slot, g_rows)
        for k in range(len(cores) - 1, 0, -1):
            lv, core = levels[k - 1], cores[k]
            p, r, q, r2 = core.shape
            prev_rows = cores[0].shape[0] if k == 1 else _store_rows(levels[k - 2], saved[k - 2])
            if lv.grouped:
                x, spilled = saved[k - 1]  # [p + E, c Q, r], [E, r, q r']
                gy = g.reshape(x.shape[0], -1, q * r2)  # [p + E, c Q, q r']
                grad = torch.bmm(x[:p].transpose(1, 2), gy[:p])  # [p, r, q r']
                if spilled is not None:  # overflow chunks: their slices' gradients, per digit
                    spill_grad = torch.bmm(x[p:].transpose(1, 2), gy[p:]).reshape(len(lv.extra), -1)
                    grad.view(p, -1).index_add_(0, lv.extra, spill_grad)
                grads[k] = grad.reshape(core.shape)
                gx = torch.empty_like(x)  # [p + E, c Q, r]
                torch.bmm(gy[:p], core.reshape(p, r, q * r2).transpose(1, 2), out=gx[:p])
                if spilled is not None:
                    torch.bmm(gy[p:], spilled.transpose(1, 2), out=gx[p:])
                gx = gx.reshape(x.shape[0] * lv.groups, -1)
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
        if ctx.param_rows is None:
            return (None, None, None, *grads)
        # per table, its rows of each stacked core's gradient (views: no copy)
        d = len(cores)
        rows = ctx.param_rows
        split = [grads[k].split(rows[k::d]) for k in range(d)]
        return (None, None, None, *(split[k][t] for t in range(len(rows) // d) for k in range(d)))


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


def _store_rows(lv: _Level, saved) -> int:
    return saved[0].shape[0] * (lv.groups if lv.grouped else 1)


def _chunk(count: torch.Tensor, most: int = 256) -> int:
    """Chunk size c for a grouped level whose digits have `count` prefixes each ([p]).

    Cost in slots (Q GEMM rows each): a chunk costs its c slots plus ~2 for the small GEMM's
    call overhead, and an overflow chunk one more (copying its digit's slice in, index_add_ of
    its gradient out). c = the largest group (no overflow) wins when groups are even; with skewed
    groups (Zipf ids, or small and large tables stacked) a smaller c stops the hottest digit from
    padding all the others. On the 7 Kaggle tables at rank 32 (2048 Zipf ids each, one thread)
    this picks c = 4 and 9 for the middle and last cores: 4,081 and 8,663 prefixes in 5,736 and
    12,357 slots, where c = the largest group (17 and 32) padded them to 17,612 and 33,248.
    """
    top = min(int(count.max()), most)
    cs = torch.arange(1, top + 1, device=count.device).unsqueeze(1)  # [top, 1]
    spill = ((count.unsqueeze(0) + cs - 1) // cs - 1).clamp(min=0).sum(1)  # [top]
    cost = (cs.squeeze(1) + 2) * (count.numel() + spill) + spill
    return int(torch.argmin(cost)) + 1

"""TT lookup on CPU through our C kernels (dlrm/kernels/tt_chain.c): the chain product one core at a time.

The PyTorch path (tt_autograd.TTRows) runs each core as batched GEMMs of tiny matrices (rank 32:
[8, 32] @ [32, 64] per digit chunk) plus the gathers and scatters that lay the prefixes out for
them; on CPU that is mostly per-matrix call overhead (docs/benchmarks.md, "TT's C kernels").
Here level k reads each distinct prefix's partial product and its digit's core slice in place,
`store_k[i] = store_{k-1}[src[i]] @ core_k[digit[i]]`, and backward accumulates both gradients in
the same loop: no gather copies, no padding, no plan beyond the digits and parents. The batch's
keys and their unique (`unique_keys`) and the plan (`plan`) are C passes too.

The kernel is compiled on first use with the system C compiler and loaded with ctypes
(dlrm/kernels/build.py: cached in `~/.cache/dlrm/kernels`, under a second to build). `emb.kernel` picks it
(tt.yaml): `auto` uses it for fp32 CPU tensors when it builds (else the PyTorch path, with one
warning), `native` requires it (else a ConfigError naming emb.kernel), `torch` never uses it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import torch

from dlrm.kernels.build import F32, I32, I64, SOURCES, NativeKernelError, P, load, loads
from dlrm.kernels.build import ptr as _ptr
from dlrm.options import ConfigError

if TYPE_CHECKING:
    from dlrm.embeddings.tt_kernels import TTShape

SOURCE = SOURCES / "tt_chain.c"
KERNELS = ("auto", "native", "torch")
SIGNATURES = {  # name: (argument types, return type), as declared in tt_chain.c
    "tt_level_layout": ([I64, I64], I32),
    "tt_level_forward": ([P, P, P, P, P, I64, I64, I64, I64, P, I32], None),
    "tt_level_backward": (
        [P, P, P, P, P, I64, I64, I64, I64, I64, P, P, P, I64, I32, I32, F32, F32, P], None
    ),
    "tt_order_by_digit": ([P, I64, I64, P, P], None),
    "tt_plan": ([P, I64, I64, I64, I64, P, P, P, P, P], I32),
    "tt_unique_keys": ([P, I64, P, I64, P, P, I64, P, P], I64),
}
__all__ = ["CoreUpdate", "NativeKernelError", "TTRowsNative", "library", "plan", "unique_keys", "use_native"]


@cache
def library() -> ctypes.CDLL:
    """tt_chain.c compiled and loaded (dlrm.kernels.build.load). Raises NativeKernelError."""
    return load(SOURCE, SIGNATURES)


@dataclass
class CoreUpdate:
    """The cores' optimizer step, fused into the lookup's backward (`TTRowsNative`).

    Each level the rows kernels run (every core but the first and, for 16-wide tables, the last)
    steps its touched core slices in place once their gradient is summed, while it is in cache,
    instead of writing a dense gradient (8.5 MB for Kaggle's stacked middle core at rank 32) for
    the optimizer to read back. Those cores then get no `.grad`; the others get theirs and the
    optimizer steps them as usual. The same arithmetic as torch.optim.SGD (no momentum) and
    Adagrad (no decays; `states[k]` its `sum` for stacked core k, laid out like the core).
    """

    optimizer: str  # "sgd" | "adagrad"
    lr: float
    eps: float = 0.0
    states: list[torch.Tensor] | None = None  # adagrad: per stacked core, its accumulator


OPTIM_CODES = {"sgd": 1, "adagrad": 2}  # tt_chain.c's `optim`


def _slices(lib: ctypes.CDLL, core: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Core `[p, r, q, r']` as the kernel reads it: `[p, r, q r']`, or `[p, q r', r]` (a transposed
    copy: True) for a level whose q r' is below 8 (the last core), which vectorizes along r."""
    p, r, q, r2 = core.shape
    if lib.tt_level_layout(r, q * r2) == -1:
        return core.reshape(p, r, q * r2).transpose(1, 2).contiguous(), True
    return core, False


def use_native(kernel: str, like: torch.Tensor) -> bool:
    """Whether a lookup on tensors like `like` runs the C kernel under `emb.kernel=kernel`.

    Raises ConfigError (a ValueError: one line naming emb.kernel) for an unknown `kernel`, or when
    `native` is asked but the kernel does not build or the tensors are not fp32 on CPU."""
    if kernel not in KERNELS:
        raise ConfigError(f"emb.kernel={kernel!r}: choose one of {list(KERNELS)}")
    if kernel == "torch":
        return False
    fits = like.device.type == "cpu" and like.dtype == torch.float32
    if kernel == "native" and not fits:
        raise ConfigError(f"emb.kernel=native runs fp32 CPU cores, got {like.dtype} on {like.device}")
    return fits and loads(library, "emb.kernel", kernel, "TT runs its")


def unique_keys(
    ids: torch.Tensor, counts: list[int], table_of: torch.Tensor, rows: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's distinct keys `table * stride + id` (sorted, [m] int64) and each id's index among
    them ([N]), for key-major `ids` ([N] int64: `counts[f]` ids of feature f, in table
    `table_of[f]` ([F] int64) of `rows[t]` rows ([T] int64)); one C pass with a radix sort.

    Raises IndexError naming the first id outside its table's rows (by position)."""
    lib, n = library(), ids.numel()
    if sum(counts) != n:
        raise ValueError(f"TT: per-feature counts {counts} do not add up to the {n} ids")
    ids = ids.contiguous()
    counts_t = torch.tensor(counts, dtype=torch.int64)
    keys, inverse = ids.new_empty(n), ids.new_empty(n)
    m = lib.tt_unique_keys(
        _ptr(ids), n, _ptr(counts_t), len(counts), _ptr(table_of), _ptr(rows), stride, _ptr(keys), _ptr(inverse)
    )
    if m == -(n + 1):
        raise MemoryError(f"TT: no memory to sort {n} ids")
    if m < 0:
        raise IndexError(f"TT id {int(ids[-m - 1])} at position {-m - 1} is outside its table's rows")
    return keys[:m], inverse


def plan(shapes: list[TTShape], keys: torch.Tensor, stride: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level k, the distinct length-(k+1) id prefixes' rows in stacked core k (`digits[k]`) and,
    for k >= 1, the rows of their parents in the previous level's store (`srcs[k - 1]`: core 0's
    row at k = 1, the parent prefix's index after), in one C pass over `keys` ([n] int64, sorted,
    distinct, table * stride + id) instead of ~25 small PyTorch ops (tt_kernels._prefixes).

    Raises IndexError for a key that is not an id within its table's row factors."""
    lib, d, n = library(), shapes[0].cores, keys.numel()
    factors = torch.tensor([s.row_factors for s in shapes], dtype=torch.int64)  # [T, d]
    offsets = torch.cumsum(factors, 0) - factors  # where table t's rows start in stacked core k
    digit, src = keys.new_empty(d, n), keys.new_empty(d, n)
    counts = keys.new_empty(d)
    keys = keys.contiguous()
    bad = lib.tt_plan(
        _ptr(keys), n, stride, len(shapes), d, _ptr(factors), _ptr(offsets), _ptr(digit), _ptr(src), _ptr(counts)
    )
    if bad:
        raise IndexError(f"TT ids outside their tables' row factors {[list(s.row_factors) for s in shapes]}")
    counts = counts.tolist()
    return [digit[k, : counts[k]] for k in range(d)], [src[k, : counts[k]] for k in range(1, d)]


def _order_by_digit(lib: ctypes.CDLL, digit: torch.Tensor, p: int) -> torch.Tensor:
    """Stable argsort of `digit` ([n] int64 in [0, p)) by a counting sort (torch.argsort: a full sort)."""
    order = torch.empty_like(digit)
    count = digit.new_empty(p + 1)
    lib.tt_order_by_digit(_ptr(digit), digit.numel(), p, _ptr(count), _ptr(order))
    return order



class TTRowsNative(torch.autograd.Function):
    """Rows `[n, dim]` of distinct ids from the cores, by the C kernels; the same contract as
    tt_autograd.TTRows but planned by digits and parents only.

    `apply(digits, srcs, shape, stacked, update, *params)`: from `plan`, `digits[k]` ([n_k] int64) each
    distinct length-(k+1) prefix's row in core k, `srcs[k - 1]` (k >= 1) its parent's row in the
    previous level's store; `shape` gives `core_shapes` and `dim` (one table's, or the joint shape
    of stacked tables). `stacked=None`: `params` are the d cores; else `stacked` holds them and
    `params` are the tables' own cores (views of it, table-major), as in TTRows. `update`: a
    CoreUpdate to step the cores inside backward (their gradients are then None), or None.
    """

    @staticmethod
    def forward(ctx, digits, srcs, shape, stacked, update, *params):
        lib, threads = library(), torch.get_num_threads()
        cores = [c.contiguous() for c in (params if stacked is None else stacked)]
        prev, Q = cores[0], shape.core_shapes[0][2]  # level 0's store: core 0 as [p_0, q_0, r_1]
        levels = []  # per level after the first: (prev store, src, digit, order, slices, transposed)
        for k in range(1, len(cores)):
            p, r, q, r2 = cores[k].shape
            src, digit = srcs[k - 1], digits[k]  # int64, contiguous rows of plan's buffers
            n = digit.numel()
            order = _order_by_digit(lib, digit, p)  # by digit: each slice read once
            slices, transposed = _slices(lib, cores[k])
            out = prev.new_empty(n, Q * q, r2)
            lib.tt_level_forward(
                _ptr(prev), _ptr(slices), _ptr(src), _ptr(digit), _ptr(order), n, Q, r, q * r2, _ptr(out), threads
            )
            levels.append((prev, src, digit, order, slices, transposed))
            prev, Q = out, Q * q
        ctx.levels, ctx.cores, ctx.update = levels, cores, update
        ctx.param_rows = [p.shape[0] for p in params] if stacked is not None else None
        return prev.view(prev.shape[0], shape.dim)

    @staticmethod
    def backward(ctx, g_rows):
        lib, threads = library(), torch.get_num_threads()
        cores = ctx.cores
        d = len(cores)
        grads: list[torch.Tensor] = [g_rows] * d
        g = g_rows.contiguous()  # the gradient of the current level's store
        for k in range(d - 1, 0, -1):
            prev, src, digit, order, slices, transposed = ctx.levels[k - 1]
            p, r, q, r2 = cores[k].shape
            Q = prev.numel() // (prev.shape[0] * r)
            gprev = torch.zeros_like(prev)
            update = ctx.update if not transposed else None  # a transposed copy: steps nothing
            if update is not None:
                optim, state = OPTIM_CODES[update.optimizer], update.states[k] if update.states else None
                gslices = grads[k] = None
            else:
                optim, state = 0, None
                gslices = torch.empty_like(slices)  # the kernel writes every slice
            lib.tt_level_backward(
                _ptr(prev), _ptr(slices), _ptr(src), _ptr(digit), _ptr(order), digit.numel(), p, Q, r, q * r2,
                _ptr(g), _ptr(gprev), _ptr(gslices), prev.shape[0], threads,
                optim, update.lr if update else 0.0, update.eps if update else 0.0, _ptr(state),
            )
            if gslices is not None:
                grads[k] = (gslices.transpose(1, 2) if transposed else gslices).reshape(cores[k].shape)
            g = gprev
        grads[0] = g.view(cores[0].shape)
        if ctx.param_rows is None:
            return (None, None, None, None, None, *grads)
        rows, tables = ctx.param_rows, len(ctx.param_rows) // d  # per table, its rows of each core
        split = [grads[k].split(rows[k::d]) if grads[k] is not None else [None] * tables for k in range(d)]
        return (None, None, None, None, None, *(split[k][t] for t in range(tables) for k in range(d)))

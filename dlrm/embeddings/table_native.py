"""Batched tables on CPU through our C kernels (dlrm/kernels/tables.c): `optim.sparse.kernel=native`.

The same tables, buffers, updates and contract as table_kernel.BatchedTables' PyTorch-ops lookup
(`_Lookup`), in four C passes per dim group instead of ~20 PyTorch ops: the group's rows (ids
checked against their tables), the pooled bags (a gather with prefetch), the ids grouped by row
(a radix sort) and, in backward, each touched row's summed gradient and optimizer step in one
loop (no [N, dim] gradient copy, no scatter, no index_add). Built and loaded by dlrm/kernels/build.py;
`optim.sparse.kernel=auto` runs it on CPU where it builds (docs/benchmarks.md, "Our table
kernel in C").
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import TYPE_CHECKING

import torch

from dlrm.kernels.build import F32, I32, I64, SOURCES, P, load, ptr

if TYPE_CHECKING:
    from dlrm.embeddings.table_kernel import BatchedTables

SOURCE = SOURCES / "tables.c"
SIGNATURES = {  # name: (argument types, return type), as declared in tables.c
    "tb_rows": ([P, P, I64, I64, P, P, P, P, I32, P, P, P, P, I32], I64),
    "tb_forward": ([P, I32, I64, P, P, I64, I64, P, P, I32], None),
    "tb_sort": ([P, I64, I64, P, P, P, I32], I64),
    "tb_backward": ([P, I32, I64, P, I32, F32, F32, P, P, P, P, I64, P, P, I32], None),
}
OPTIM_CODES = {"sgd": 0, "rowwise_adagrad": 1, "adagrad": 2}  # tables.c's enum


@cache
def library() -> ctypes.CDLL:
    """tables.c compiled and loaded (dlrm.kernels.build.load). Raises NativeKernelError."""
    return load(SOURCE, SIGNATURES)


class LookupNative(torch.autograd.Function):
    """`BatchedTables.forward` by the C kernels: pooled rows `[B, sum of feature dims]` fp32 from
    key-major int64 `indices [N]` and `offsets [F * B + 1]`; backward steps the touched rows in
    place (the table optimizer fused, as fbgemm's TBE) and returns no gradient. `train=False`
    (evaluation) pools without sorting and saves nothing.

    Raises IndexError naming the first id outside its table's rows (by position in `indices`)."""

    @staticmethod
    def forward(ctx, anchor, tables: BatchedTables, indices, offsets, per_sample_weights, train: bool):
        lib, threads = library(), torch.get_num_threads()
        n_features = len(tables.feature_table_map)
        batch = (offsets.numel() - 1) // n_features
        indices, offsets = indices.contiguous(), offsets.contiguous()
        psw = None if per_sample_weights is None else per_sample_weights.float().contiguous()
        weighted = psw is not None or tables.pooling == "mean"
        ctx.tables, ctx.saved = tables, []
        outs = []
        for g, fs in enumerate(tables.group_features):
            if not fs:
                continue
            feats, base, limit = tables.group_feature_index[g], tables.group_row_offsets[g], tables.group_row_limits[g]
            nf, dim, weights = len(fs), tables.dims[g], tables.weights(g)
            if nf == n_features:
                n = indices.numel()
            else:  # the group's features' ids (key-major: each feature's ids are one run)
                per_feature = offsets[::batch].diff()
                n = int(per_feature.index_select(0, feats).sum())
            rows, goffsets = indices.new_empty(n), offsets.new_empty(nf * batch + 1)
            gpos = indices.new_empty(n) if train else None
            wt = torch.empty(n) if weighted else None
            bad = lib.tb_rows(
                ptr(indices), ptr(offsets), batch, nf, ptr(feats), ptr(base), ptr(limit), ptr(psw),
                int(tables.pooling == "mean"), ptr(rows), ptr(goffsets), ptr(gpos), ptr(wt), threads,
            )
            if bad < 0:
                i = -bad - 1
                feature = (int(torch.searchsorted(offsets, torch.tensor(i), right=True)) - 1) // batch
                raise IndexError(
                    f"id {int(indices[i])} at position {i} (feature {feature}) is outside its table's "
                    f"{tables.shapes[tables.feature_table_map[feature]][0]} rows"
                )
            fp16 = int(weights.dtype == torch.float16)
            out = torch.empty(batch, nf, dim)
            lib.tb_forward(ptr(weights), fp16, dim, ptr(rows), ptr(goffsets), nf, batch, ptr(wt), ptr(out), threads)
            if train:
                order, unique, starts = torch.empty_like(rows), torch.empty_like(rows), rows.new_empty(n + 1)
                u = lib.tb_sort(ptr(rows), n, weights.shape[0] - 1, ptr(order), ptr(unique), ptr(starts), threads)
                if u == -1:
                    raise MemoryError(f"no memory to sort the batch's {n} ids")
                if u < 0:  # rows of 2^(64 - log2 n) and more: no table comes near
                    raise ValueError(f"{weights.shape[0]} rows and {n} ids do not fit the sort's 64-bit keys")
                ctx.saved.append((g, order, unique[:u], starts, gpos, wt))
            outs.append((g, out))
        if len(outs) == 1 and len(tables.group_features[outs[0][0]]) == n_features:  # one dim: the usual case
            return outs[0][1].view(batch, -1)
        result = torch.empty(batch, sum(len(c) for c in tables.group_columns))
        for g, out in outs:
            result.index_copy_(1, tables.group_columns[g], out.view(batch, -1))
        return result

    @staticmethod
    def backward(ctx, grad_output):
        lib, threads = library(), torch.get_num_threads()
        tables: BatchedTables = ctx.tables
        grad_output = grad_output.float()
        optim, lr, eps = OPTIM_CODES[tables.optimizer], tables.lr, tables.eps
        for g, order, unique, starts, gpos, wt in ctx.saved:
            if len(tables.group_features[g]) == len(tables.feature_table_map):
                grad = grad_output.contiguous()  # [B, F * dim]: already [B, F, dim]
            else:
                grad = grad_output.index_select(1, tables.group_columns[g])
            weights = tables.weights(g)
            lib.tb_backward(
                ptr(weights), int(weights.dtype == torch.float16), tables.dims[g], ptr(tables.states(g)), optim,
                lr, eps, ptr(grad), ptr(order), ptr(unique), ptr(starts), unique.numel(), ptr(gpos), ptr(wt), threads,
            )
        return None, None, None, None, None, None

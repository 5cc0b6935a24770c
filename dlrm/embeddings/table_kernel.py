"""Our batched table kernel: many tables looked up in one call, the table optimizer fused in backward.

`BatchedTables` has the contract tables.py uses of fbgemm's TBE (`SplitTableBatchedEmbeddingBags
Codegen`): `tables(indices, offsets, per_sample_weights=None) -> [B, sum of dims]` fp32, with
key-major int64 `indices [N]` and `offsets [F * B + 1]`; `split_embedding_weights()` (a
`[rows, dim]` view per table) and `split_optimizer_states()` (per table, `[state]`: `[rows]` for
row-wise Adagrad, `[rows, dim]` for Adagrad, none for SGD). It is written in PyTorch ops because
on CPU fbgemm 1.8's fused backward with row-wise Adagrad took 15-28 ms per Kaggle-size step (26
tables, 33.8M rows, batch 2048) where this takes about 7 ms (docs/benchmarks.md, "Our table
kernel"); `optim.sparse.kernel` chooses (auto: this one on CPU, fbgemm on CUDA).

The update is fbgemm's "exact" optimizers' (tests/test_table_kernel.py checks it against fbgemm):
the gradients of every lookup of a row in the batch are summed first, then, with `g` that sum,

    sgd:              w[r] -= lr * g
    rowwise_adagrad:  s[r] += mean(g^2);  w[r] -= lr * g / (sqrt(s[r]) + eps)
    adagrad:          s[r] += g^2;        w[r] -= lr * g / (sqrt(s[r]) + eps)   (per column)

and only rows the batch touched change. fp16 rows are updated as fbgemm's CPU kernel does it,
w <- fp16(w + fp16(delta)); optimizer state stays fp32.

Layout: tables of one dim share one flat `[rows, dim]` weight (and state) tensor, so each distinct
dim costs one `embedding_bag` call and one update; mixed dims (emb=mde) make several groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlrm.embeddings.table_native import LookupNative
from dlrm.malloc import advise_huge_pages

OPTIMIZERS = ("sgd", "rowwise_adagrad", "adagrad")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
KERNELS = ("torch", "native")  # who computes: these PyTorch ops, or our C kernels (table_native.py)


class BatchedTables(nn.Module):
    """Tables of `shapes` (`(rows, dim)` each) looked up by features (`feature_table_map[f]` is
    feature f's table), pooled by `pooling` (sum | mean), rows stored in `precision` (fp32 | fp16)
    and trained by `optimizer` (sgd | rowwise_adagrad | adagrad, learning rate `lr`, `eps`) inside
    backward. Weights start at zero, or with `zero_weights=False` unset (for a caller that
    fills every row at once: zeroing Kaggle's 2.2 GB first added 0.16 s to start-up); initialize
    them through `split_embedding_weights()`.
    `kernel`: `torch` computes with the PyTorch ops below, `native` (CPU only) with our C kernels
    (table_native.py); both hold the same buffers, so either loads the other's state.

    Raises ValueError for an unknown optimizer, pooling, precision or kernel.
    """

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        feature_table_map: list[int],
        optimizer: str,
        lr: float,
        eps: float = 1e-8,
        pooling: str = "sum",
        precision: str = "fp32",
        device: torch.device | None = None,
        kernel: str = "torch",
        zero_weights: bool = True,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r}: choose one of {KERNELS}")
        self.kernel = kernel
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r}: choose one of {OPTIMIZERS}")
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling {pooling!r}: choose sum or mean")
        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r}: choose one of {list(DTYPES)}")
        self.shapes = [(int(r), int(d)) for r, d in shapes]
        self.feature_table_map = list(feature_table_map)
        self.optimizer, self.lr, self.eps, self.pooling = optimizer, float(lr), float(eps), pooling
        self.dims = sorted({d for _, d in self.shapes})
        # Where each table lives: (group = index of its dim, first row in the group's tensor).
        group_rows = [0] * len(self.dims)
        self.placement: list[tuple[int, int]] = []
        for rows, dim in self.shapes:
            g = self.dims.index(dim)
            self.placement.append((g, group_rows[g]))
            group_rows[g] += rows
        # Huge pages for the PyTorch ops' random row reads only: the C kernel prefetches its rows (the
        # page walks with them), where huge pages measured no step gain but 2.5 s more start-up for
        # Kaggle's 2.2 GB (the kernel compacting memory for 1,100 huge pages; docs/benchmarks.md).
        huge = kernel == "torch"
        for g, (dim, rows) in enumerate(zip(self.dims, group_rows)):
            weights = _empty((rows, dim), DTYPES[precision], device, huge)
            self.register_buffer(f"weights_{g}", weights.zero_() if zero_weights else weights)
            if optimizer != "sgd":
                shape = (rows,) if optimizer == "rowwise_adagrad" else (rows, dim)
                self.register_buffer(f"momentum1_{g}", _empty(shape, torch.float32, device, huge).zero_())
        # Per group: its features (in order) and the row offset of each one's table.
        self.group_features: list[list[int]] = [[] for _ in self.dims]
        for f, t in enumerate(self.feature_table_map):
            self.group_features[self.placement[t][0]].append(f)
        self.group_row_offsets = [
            torch.tensor([self.placement[self.feature_table_map[f]][1] for f in fs], dtype=torch.int64, device=device)
            for fs in self.group_features
        ]
        # Mixed dims: each group's output columns in [B, sum of feature dims] and, per feature, its
        # group and its table's first row in the group's tensor (the group inputs and outputs are
        # then a handful of gathers per group, not a Python loop over features).
        dims = [self.shapes[t][1] for t in self.feature_table_map]
        starts = [sum(dims[:f]) for f in range(len(dims))]
        self.group_columns = [
            torch.tensor([starts[f] + c for f in fs for c in range(self.dims[g])], dtype=torch.int64, device=device)
            for g, fs in enumerate(self.group_features)
        ]
        self.group_feature_index = [torch.tensor(fs, dtype=torch.int64, device=device) for fs in self.group_features]
        place = [self.placement[t] for t in self.feature_table_map]
        self.feature_group = torch.tensor([g for g, _ in place], dtype=torch.int64, device=device)  # [F]
        self.feature_row_offset = torch.tensor([r for _, r in place], dtype=torch.int64, device=device)  # [F]
        # Per group, its features' tables' row counts (the C kernel checks each id against them).
        self.group_row_limits = [
            torch.tensor([self.shapes[self.feature_table_map[f]][0] for f in fs], dtype=torch.int64)
            for fs in self.group_features
        ]
        # autograd calls backward only for outputs that depend on a tensor requiring grad
        self._anchor = torch.zeros(0, device=device, requires_grad=True)

    def weights(self, g: int) -> torch.Tensor:
        return getattr(self, f"weights_{g}")

    def states(self, g: int) -> torch.Tensor | None:
        return getattr(self, f"momentum1_{g}", None)

    def split_embedding_weights(self) -> list[torch.Tensor]:
        """One `[rows, dim]` view per table (writes land in the table)."""
        return [self.weights(g)[start : start + rows] for (rows, _), (g, start) in zip(self.shapes, self.placement)]

    def split_optimizer_states(self) -> list[list[torch.Tensor]]:
        """Per table, `[state view]` (`[rows]` row-wise Adagrad, `[rows, dim]` Adagrad); `[]` for SGD."""
        if self.optimizer == "sgd":
            return []
        return [[self.states(g)[start : start + rows]] for (rows, _), (g, start) in zip(self.shapes, self.placement)]

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled rows `[B, sum of feature dims]` (fp32) of the bags given by key-major `indices`
        `[N]` and `offsets` `[F * B + 1]` (F = len(feature_table_map)); `per_sample_weights` `[N]`
        scale each id's row (sum pooling only)."""
        if per_sample_weights is not None and self.pooling != "sum":
            raise ValueError("per_sample_weights need sum pooling")
        # Without autograd (evaluation) there is no backward to prepare: each id's row is gathered
        # directly, no sort of the batch's ids (eval's table lookups measured 2x faster so).
        if self.kernel == "native":
            return LookupNative.apply(self._anchor, self, indices, offsets, per_sample_weights, torch.is_grad_enabled())
        return _Lookup.apply(self._anchor, self, indices, offsets, per_sample_weights, torch.is_grad_enabled())

    # ------------------------------------------------------------------ per dim group

    def _group_input(self, g: int, indices: torch.Tensor, offsets: torch.Tensor, batch: int, feature=None):
        """Group g's ids as rows of its tensor, its offsets `[nf * B + 1]` and the positions in
        `indices` they came from (None when it is all of them). `feature` `[N]`: each id's
        feature (needed with several groups)."""
        if len(self.group_features[g]) == len(self.feature_table_map):  # one dim for every feature (the usual case)
            counts = offsets[::batch].diff()  # [F]: ids per feature
            rows = indices + self.group_row_offsets[g].repeat_interleave(counts, output_size=indices.numel())
            return rows, offsets, None
        pos = (self.feature_group.index_select(0, feature) == g).nonzero().squeeze(1)  # ascending: feature-major
        rows = indices.index_select(0, pos) + self.feature_row_offset.index_select(0, feature.index_select(0, pos))
        lengths = offsets.diff().view(-1, batch).index_select(0, self.group_feature_index[g]).reshape(-1)
        return rows, torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]), pos

    @torch.no_grad()
    def _update(self, g: int, unique: torch.Tensor, summed: torch.Tensor) -> None:
        """Apply the optimizer to group g's rows `unique [U]` (distinct), `summed [U, dim]` (fp32)
        the sum of each one's gradients in the batch."""
        if self.optimizer == "sgd":
            delta = summed.mul_(-self.lr)
        else:
            state = self.states(g)
            square = summed.square()
            if self.optimizer == "rowwise_adagrad":
                square = square.mean(1)
            new = state.index_select(0, unique).add_(square)
            state.index_copy_(0, unique, new)
            scale = (-self.lr) / new.sqrt_().add_(self.eps)  # fbgemm's rounding: lr / (sqrt(s) + eps)
            delta = summed.mul_(scale.unsqueeze(1) if scale.dim() == 1 else scale)
        weights = self.weights(g)
        if weights.dtype == torch.float32 or self.optimizer != "rowwise_adagrad":
            weights.index_add_(0, unique, delta.to(weights.dtype))  # fp16: w + fp16(delta), as fbgemm
        else:  # fbgemm's row-wise Adagrad adds in fp32 and rounds once: fp16(w + delta)
            weights.index_copy_(0, unique, weights.index_select(0, unique).float().add_(delta).to(weights.dtype))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device, huge_pages: bool) -> torch.Tensor:
    """An unset tensor of `shape`; with `huge_pages`, on CPU backed by transparent huge pages
    where Linux gives them (lookups read random rows: huge pages spare a TLB miss per row,
    dlrm/malloc.py), advised before anything touches the memory."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if huge_pages and t.device.type == "cpu":
        advise_huge_pages(t.data_ptr(), t.nbytes)
    return t


class _Lookup(torch.autograd.Function):
    """Per dim group. Forward: the batch's distinct rows gathered once, in ascending order (fewer
    and more local memory reads than one random read per id: a Kaggle batch of 53k ids touches
    about 16k rows), then pooled from that small block. Where every bag holds one id (Criteo's
    one-hot features) the output is gathered batch-major directly, and backward sums the
    gradient `[B, F * dim]` into the distinct rows without a transpose. Backward: each id's
    gradient (its bag's, scaled for mean pooling and per-sample weights) summed per distinct
    row, then `BatchedTables._update`; no gradient flows anywhere else. Called without autograd
    (`train=False`: evaluation), forward gathers every id's row directly and saves nothing: the
    same bags without the sort that only the update needs."""

    @staticmethod
    def forward(ctx, anchor, tables: BatchedTables, indices, offsets, per_sample_weights, train: bool):
        n_features = len(tables.feature_table_map)
        batch = (offsets.numel() - 1) // n_features
        ctx.tables, ctx.batch, ctx.saved = tables, batch, []
        result = feature = None
        if len(tables.dims) > 1:  # mixed dims: every group writes its features' columns
            result = indices.new_empty((batch, sum(len(c) for c in tables.group_columns)), dtype=torch.float32)
            counts = offsets[::batch].diff()  # [F]: ids per feature
            feature = torch.arange(n_features, device=indices.device).repeat_interleave(counts, output_size=indices.numel())
        for g, fs in enumerate(tables.group_features):
            if not fs:
                continue
            rows, group_offsets, pos = tables._group_input(g, indices, offsets, batch, feature)
            scale = None if per_sample_weights is None else (
                per_sample_weights if pos is None else per_sample_weights[pos]
            ).float()
            if train:  # the distinct rows, once each: [U, dim]; fp16 rows pool in fp32
                unique, inverse = torch.unique(rows, return_inverse=True)
                gathered = tables.weights(g).index_select(0, unique).float()
            else:  # every id's row, in id order: [N, dim]
                unique = inverse = None
                gathered = tables.weights(g).index_select(0, rows).float()
            lengths = group_offsets.diff()
            one_hot = rows.numel() == lengths.numel() and bool((lengths == 1).all())
            order = inverse
            if one_hot:  # id k of feature f is bag (f, b): [B, nf, dim] in (b, f) order
                if inverse is None:
                    out = gathered.view(len(fs), batch, -1).transpose(0, 1)
                else:
                    order = inverse.view(len(fs), batch).t().reshape(-1)
                    out = gathered.index_select(0, order).view(batch, len(fs), -1)
                if scale is not None:
                    scale = scale.view(len(fs), batch).t().reshape(batch, len(fs), 1)
                    out = out * scale
            else:
                ids = inverse if inverse is not None else torch.arange(rows.numel(), device=rows.device)
                out = F.embedding_bag(
                    ids, gathered, group_offsets, mode=tables.pooling, per_sample_weights=scale,
                    include_last_offset=True,
                ).view(len(fs), batch, -1).transpose(0, 1)  # [B, nf, dim]
            if train:
                ctx.saved.append((g, unique, order, lengths, scale, one_hot))
            if result is None:  # one dim group (the usual case)
                return out.reshape(batch, -1)
            result.index_copy_(1, tables.group_columns[g], out.reshape(batch, -1))
        return result

    @staticmethod
    def backward(ctx, grad_output):
        tables: BatchedTables = ctx.tables
        batch, grad_output = ctx.batch, grad_output.float()
        for g, unique, order, lengths, scale, one_hot in ctx.saved:
            fs, dim = tables.group_features[g], tables.dims[g]
            if len(fs) == len(tables.feature_table_map):
                bag_grads = grad_output.reshape(batch, len(fs), dim)
            else:
                bag_grads = grad_output.index_select(1, tables.group_columns[g]).view(batch, len(fs), dim)
            if one_hot:  # batch-major, as `order`; mean of one id = sum
                id_grads = bag_grads.reshape(-1, dim)
            else:
                bag_grads = bag_grads.transpose(0, 1).reshape(-1, dim)  # key-major bags
                if tables.pooling == "mean":
                    bag_grads = bag_grads / lengths.clamp(min=1).unsqueeze(1)
                id_grads = bag_grads.repeat_interleave(lengths, dim=0, output_size=order.numel())
            if scale is not None:
                id_grads = id_grads * scale.reshape(-1, 1)
            # scatter_add_ over a stride-0 view of the index (index_add_ builds an [N, dim] index
            # first: 1.1-2.0 ms against 1.05 ms for a Kaggle batch, the same sums bit for bit)
            summed = torch.zeros(unique.numel(), dim, device=id_grads.device).scatter_add_(
                0, order.unsqueeze(1).expand(-1, dim), id_grads.contiguous()
            )
            tables._update(g, unique, summed)
        return None, None, None, None, None, None

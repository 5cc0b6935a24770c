"""`emb=mde`: mixed-dimension embeddings (Ginart et al., "Mixed Dimension Embeddings with
Application to Memory-Efficient Recommendation Systems", ISIT 2021, arXiv 1909.11810).

Each compressed table's ids are split by frequency into `blocks` blocks of geometrically growing
size (by frequency rank r: block k holds ranks [rows^(k/K), rows^((k+1)/K)), the first starting at
0), so the few hot ids form the first block and the long tail the last. Block k gets the width of
the paper's power rule

    d_k = clamp(round(scale * dim * (p_k / p_0)^alpha), min_dim, dim)

where p_k is the mean frequency of an id of block k (from per-id counts, frequency.py): the hot
block is `dim` wide (at scale 1), rare ids get narrow rows. Widths are rounded to multiples of 4,
fbgemm's row alignment, so at dim 16 with row-wise Adagrad (4 bytes of state per row) a table
shrinks at most (16 + 1) / (4 + 1) = 3.4x: MDE cannot reach 10x here (the VLDB 2024 study reports
MDE reaching about 11x; even 1-wide rows would stop at (16 + 1) / (1 + 1) = 8.5x with a row-wise
optimizer state). Each block holds plain fused rows (updated in backward, as emb=full); blocks
narrower than `dim` are followed by a learned projection P_k [d_k, dim] (initialized to [I | 0]),
full-width blocks are used as they are (as facebookresearch/dlrm's md_embedding_bag, whose
projection is the identity at the base dim). The pooled output of a bag is the sum over its ids
of e_id P_block(id).

Layout, for speed (docs/benchmarks.md, "MDE's step"): one fused table per distinct width, holding
every block of that width of every table, so a batch costs one lookup per width, not one per
block; each width's rows are pooled into their bags, the narrow ones projected by one batched
matmul over a zero-padded [tables, sum of narrow widths, dim] projection.

Rows. Blocks 0..K-2 are numbered by the sorted ids they hold; which block an id is in and its row
come from a bitmap over the table's ids (a bit per id, set for head ids, in 32-bit words with each
word's rank: 8 bytes per 32 ids) and, per head id, an int32 row and an int8 width group (5 bytes):
a gather and a popcount per lookup, not a binary search. The last block is indexed by the id
itself (a table of `rows` rows at width d_{K-1}, whose rows of head ids go unused: at most
rows^((K-1)/K) rows), so the tail needs no index. `embedding_bytes` counts all of it, plus the
projections and their optimizer state (`emb.optimizer`, stepped by `optimizers()` like TT's
cores; the trainer's dense optimizer never sees them).

Example::

    cfg = OmegaConf.create({"alpha": 0.15})    # ids of a 1M-row table ranked by counts (runtime)
    emb = MDEEmbeddings([TableSpec("t_C3", 1_000_000, 16, ("C3",))], cfg, sparse_optim, cpu, runtime)
    emb.block_rows["t_C3"], emb.block_dims["t_C3"]     # [32, 968, 1000000], [16, 8, 4] (Zipf ids)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import EmbeddingBackend, Runtime, TableSpec, check_ids_in_range
from dlrm.embeddings.frequency import counts_source, frequency_order
from dlrm.embeddings.policy import POLICY_OPTIONS, resolve_table
from dlrm.embeddings.tables import fused_tables, init_uniform_, tbe_bytes
from dlrm.options import Opt

WORD_BITS = 32  # the head-id bitmap's word: int32, read as an unsigned 32-bit value
OPTIMIZERS = ("adagrad", "sgd")
ALIGN = 4  # fbgemm TBE rows are a multiple of 4 floats wide


def block_bounds(rows: int, blocks: int) -> list[int]:
    """Rank boundaries [0, b_1, ..., rows] of up to `blocks` non-empty blocks: b_k = ceil(rows^(k/K)).

    >>> block_bounds(1_000_000, 4), block_bounds(3, 4)
    ([0, 32, 1000, 31623, 1000000], [0, 2, 3])
    """
    inner = [math.ceil(rows ** (k / blocks)) for k in range(1, blocks)]
    return sorted({0, rows, *(b for b in inner if 0 < b < rows)})


def block_dims(freq: list[float], dim: int, alpha: float, scale: float, min_dim: int) -> list[int]:
    """Widths by the power rule d_k = clamp(scale * dim * (p_k / p_0)^alpha, min_dim, dim), rounded
    to a multiple of ALIGN (fbgemm's tables are multiples of 4 wide); `freq` is the mean frequency
    of an id of each block, most frequent block first.

    >>> block_dims([1e-2, 1e-4, 1e-6], 16, 0.3, 1.0, 4)
    [16, 4, 4]
    """
    top = max(freq[0], 1e-300)
    widths = [scale * dim * (max(p, 0.0) / top) ** alpha for p in freq]
    return [int(min(dim, max(min_dim, ALIGN * round(w / ALIGN)))) for w in widths]


def check_dims(dims: list[int], bounds: list[int], table: TableSpec) -> None:
    """A one-line error naming emb.dims.<feature> unless `dims` gives one fbgemm-aligned width
    in [ALIGN, dim] per block of `bounds`, none wider than the block before it (frequent ids wide,
    rare ids narrow: then each width is one block of the table, one slot of its projection)."""
    if len(dims) != len(bounds) - 1 or not all(0 < d <= table.dim and d % ALIGN == 0 for d in dims):
        raise ValueError(
            f"emb.dims.{table.features[0]}={dims}: needs {len(bounds) - 1} widths, multiples of "
            f"{ALIGN} in [{ALIGN}, {table.dim}] (blocks of ranks {bounds})"
        )
    if any(b > a for a, b in zip(dims, dims[1:])):
        raise ValueError(
            f"emb.dims.{table.features[0]}={dims}: a block is wider than the one before it; widths "
            "must stay or narrow from the most frequent ids to the rarest"
        )


def merge_blocks(bounds: list[int], dims: list[int]) -> tuple[list[int], list[int]]:
    """Neighbouring blocks of one width become one block (fewer head ids to index).

    >>> merge_blocks([0, 2, 10, 50, 100], [16, 4, 4, 4])
    ([0, 2, 100], [16, 4])
    """
    keep = [k for k in range(1, len(dims)) if dims[k] != dims[k - 1]]
    return [0, *(bounds[k] for k in keep), bounds[-1]], [dims[0], *(dims[k] for k in keep)]


def mde_bytes(rows: int, dim: int, bounds: list[int], dims: list[int], row_cost, proj_optimizer: str) -> int:
    """Bytes `MDEEmbeddings.embedding_bytes` counts for one table with merged `bounds`/`dims`:
    block rows (`row_cost(width)` bytes each, weights + fused state; the last block has `rows`
    rows), the head-id index (with head blocks: a bitmap and a rank per 32 ids, 8 bytes per 32
    rows, plus 5 bytes per head id), the [sum of the narrow dims, dim] projection (x2 with
    Adagrad's sum, plus its 4-byte step; none when every block is `dim` wide)."""
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    index = 8 * -(-rows // WORD_BITS) + 5 * sum(sizes[:-1]) if len(sizes) > 1 else 0
    table = sum(n * row_cost(d) for n, d in zip(sizes[:-1] + [rows], dims))
    proj = sum(d for d in dims if d < dim) * dim * 4
    if proj and proj_optimizer == "adagrad":
        proj = 2 * proj + 4
    return table + index + proj


def block_freqs(counts: np.ndarray, bounds: list[int]) -> list[float]:
    """Mean count per id of each block of `counts` (sorted, most frequent first)."""
    return [float(counts[a:b].mean()) for a, b in zip(bounds, bounds[1:])]


class MDEEmbeddings(EmbeddingBackend):
    """Frequency blocks of per-block width, each projected to `dim` (see the module doc)."""

    name = "mde"
    options = {
        **POLICY_OPTIONS,
        "blocks": Opt(int, min=1),
        "alpha": Opt(float),
        "scale": Opt(float),
        "min_dim": Opt(int, min=1),
        "dims": Opt(dict, nullable=True),
        "counts": Opt(str, nullable=True),
        "optimizer": Opt(str, choices=OPTIMIZERS),
        "lr": Opt(float, min=0),
        "eps": Opt(float, min=0),
    }

    def __init__(
        self,
        tables: list[TableSpec],
        cfg: DictConfig,
        optim: DictConfig,
        device: torch.device,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(tables)
        cfg = self.settings(cfg)
        self.pooling = cfg.pooling
        for key in ("alpha", "scale"):  # types and the rest: `options`
            if not cfg[key] > 0:
                raise ValueError(f"emb.{key}={cfg[key]!r}: must be a number > 0")
        blocks, min_dim = cfg.blocks, cfg.min_dim
        dim = max(t.dim for t in self.tables)
        if not ALIGN <= min_dim <= dim or min_dim % ALIGN:
            raise ValueError(f"emb.min_dim={min_dim!r}: must be a multiple of {ALIGN} in [{ALIGN}, emb.dim={dim}]")
        shared = [t.name for t in self.tables if len(t.features) != 1]
        if shared:  # a batch's features are its tables, in order (the routing relies on it)
            raise ValueError(f"emb=mde: tables {shared} are shared by several features; mde takes one feature per table")
        dims_given = _dims_overrides(cfg.dims, self.tables)

        source = counts_source(cfg.counts, runtime, self.name)
        self.block_rows: dict[str, list[int]] = {}  # physical rows per block (the last: all rows)
        self.block_dims: dict[str, list[int]] = {}
        plans = []  # per table: (sorted-by-frequency ids, merged bounds)
        for t in self.tables:
            bounds = block_bounds(t.rows, blocks)
            order, counts = frequency_order(t, source)
            dims = dims_given.get(t.name) or block_dims(
                block_freqs(counts, bounds), t.dim, float(cfg.alpha), float(cfg.scale), min_dim
            )
            check_dims(dims, bounds, t)
            bounds, dims = merge_blocks(bounds, dims)
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            self.block_rows[t.name] = sizes[:-1] + [t.rows]
            self.block_dims[t.name] = list(dims)
            plans.append((order, bounds))

        if sum(t.rows for t in self.tables) >= 2**31:  # head ranks and group rows are int32
            raise ValueError(f"emb=mde: tables {[t.name for t in self.tables]} hold 2^31 rows or more")
        # One fused table per width: every block of that width, of every table, stacked; block
        # (t, k) starts at row block_start[t][k] of width group group_of[t][k].
        self.widths = sorted({d for dims in self.block_dims.values() for d in dims}, reverse=True)
        self.block_group: dict[str, list[int]] = {}
        self.block_start: dict[str, list[int]] = {}
        group_rows = [0] * len(self.widths)
        for t in self.tables:
            self.block_group[t.name], self.block_start[t.name] = [], []
            for n, d in zip(self.block_rows[t.name], self.block_dims[t.name]):
                g = self.widths.index(d)
                self.block_group[t.name].append(g)
                self.block_start[t.name].append(group_rows[g])
                group_rows[g] += n
        self.width_tables = nn.ModuleList(
            fused_tables([TableSpec(f"mde_w{w}", n, w, (f"mde_w{w}",))], optim, "sum", device, cfg.weights_precision, init=False)
            for w, n in zip(self.widths, group_rows)
        )
        with torch.no_grad():  # every block at its logical table's init bound, 1 / sqrt(rows)
            for t in self.tables:
                for w in self.block_weights(t.name):
                    init_uniform_(w, t.rows)

        # Head ids (every block but the last): per table a bitmap over its ids (bit x set: id x is
        # in a head block) in 32-bit words, with each word's rank (head ids before it, over all
        # tables); the head id of rank j sits in row head_row[j] of width group head_group[j].
        # A lookup is a gather and a popcount, not a binary search (docs/benchmarks.md).
        words = [-(-t.rows // WORD_BITS) if len(b) > 2 else 0 for t, (_, b) in zip(self.tables, plans)]
        bits, ranks, head_rows, head_groups, done = [], [], [], [], 0
        for t, (order, bounds), n_words in zip(self.tables, plans, words):
            if not n_words:
                continue
            blocks = list(zip(bounds[:-2], bounds[1:-1]))
            ids = [np.sort(order[a:b]) for a, b in blocks]  # block rows are numbered by sorted id
            place = [self.block_start[t.name][k] + np.arange(len(i)) for k, i in enumerate(ids)]  # row in its width group
            group = [np.full(len(i), self.block_group[t.name][k], np.int8) for k, i in enumerate(ids)]
            ids = np.concatenate(ids)
            by_id = np.argsort(ids)  # rank j = the j-th smallest head id of the table
            head_rows.append(np.concatenate(place)[by_id])
            head_groups.append(np.concatenate(group)[by_id])
            head = np.zeros(n_words * WORD_BITS, dtype=bool)
            head[ids] = True
            bits.append(np.packbits(head, bitorder="little").view(np.int32))
            per_word = head.reshape(n_words, WORD_BITS).sum(1)
            ranks.append(done + np.concatenate([[0], np.cumsum(per_word)[:-1]]))
            done += len(ids)
        cat = lambda parts, dtype: torch.from_numpy(np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)).to(device)
        self.register_buffer("head_bits", cat(bits, np.int32))
        self.register_buffer("head_rank", cat(ranks, np.int32))
        self.register_buffer("head_row", cat(head_rows, np.int32))
        self.register_buffer("head_group", cat(head_groups, np.int8))
        starts = np.concatenate([[0], np.cumsum(words)[:-1]])
        # A table without head blocks reads word 0 (word index times has_head = 0) and masks the bit away.
        self.register_buffer("word_start", torch.tensor(starts * (np.array(words) > 0), dtype=torch.int64, device=device))
        self.register_buffer("has_head", torch.tensor([int(n > 0) for n in words], dtype=torch.int64, device=device))
        # The last block of table i: group tail_group[i], rows from tail_start[i], indexed by id.
        self.register_buffer("tail_group", torch.tensor([self.block_group[t.name][-1] for t in self.tables], device=device))
        self.register_buffer("tail_start", torch.tensor([self.block_start[t.name][-1] for t in self.tables], device=device))

        # Projections: per table with narrow blocks, P = [sum of its narrow widths, dim], block
        # k's rows P_k (init [I | 0]). Full-width blocks are not projected (their rows are the
        # output, as in facebookresearch/dlrm's md_embedding_bag: Identity at base_dim). For the
        # lookup they are laid out as one zero-padded [T, S, dim] tensor, S = the sum of the narrow
        # widths: every table's pooled narrow rows are S wide, width group g in columns
        # column[g] ..., zeros where a table has no block of that width; one bmm projects them all.
        self.dim = dim
        if any(t.dim != dim for t in self.tables):
            raise ValueError(f"emb=mde: tables {[t.name for t in self.tables]} must share one dim")
        narrow = [d for d in self.widths if d < dim]
        self.columns = {g: sum(narrow[: narrow.index(d)]) for g, d in enumerate(self.widths) if d < dim}
        self.span = sum(narrow)
        self.projections = nn.ParameterDict(
            {
                t.name: nn.Parameter(_stacked_identity([d for d in self.block_dims[t.name] if d < dim], dim, device))
                for t in self.tables
                if min(self.block_dims[t.name]) < dim
            }
        )
        self.register_buffer(
            "projection_rows",  # row of the padded [T * S, dim] each stacked projection row goes to
            torch.tensor(
                [
                    i * self.span + self.columns[g] + c
                    for i, t in enumerate(self.tables)
                    for g, d in zip(self.block_group[t.name], self.block_dims[t.name])
                    if d < dim
                    for c in range(d)
                ],
                dtype=torch.int64, device=device,
            ),
        )
        self.optimizer_name = cfg.optimizer
        params = list(self.projections.parameters())
        self._optimizer = None
        if params and self.optimizer_name == "adagrad":
            self._optimizer = torch.optim.Adagrad(params, lr=float(cfg.lr), eps=float(cfg.eps), fused=True)
        elif params:
            self._optimizer = torch.optim.SGD(params, lr=float(cfg.lr), fused=True)
        self.check_ids = cfg.check_ids

    def block_weights(self, table: str) -> list[torch.Tensor]:
        """Views of table `table`'s blocks, `[block_rows[k], block_dims[k]]` each (block k's row r
        is the r-th smallest id of the block; the last block's row is the id itself)."""
        return [
            self.width_tables[g].split_embedding_weights()[0][s : s + n]
            for g, s, n in zip(self.block_group[table], self.block_start[table], self.block_rows[table])
        ]

    def _route(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(width group of each id [N] int64, its row in that group's table [N] int64), in value
        order."""
        values = features.values()
        table = torch.arange(len(self.tables), device=values.device).repeat_interleave(
            torch.tensor(features.length_per_key(), device=values.device), output_size=values.numel()
        )
        group = self.tail_group.index_select(0, table)
        rows = self.tail_start.index_select(0, table) + values
        if len(self.head_row):
            has_head = self.has_head.index_select(0, table)
            word = self.word_start.index_select(0, table) + (values >> 5) * has_head  # 2^5 = WORD_BITS
            bits = self.head_bits.index_select(0, word).long() & 0xFFFFFFFF
            bit = values & (WORD_BITS - 1)
            hit = ((bits >> bit) & has_head).bool()
            rank = self.head_rank.index_select(0, word).long() + _popcount32(bits & ((1 << bit) - 1))
            rank = rank.clamp_(max=len(self.head_row) - 1)  # a miss may point one past the last
            group = torch.where(hit, self.head_group.index_select(0, rank).long(), group)
            rows = torch.where(hit, self.head_row.index_select(0, rank).long(), rows)
        return group, rows

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        b, f, dim = features.stride(), len(self.features), self.dim
        group, rows = self._route(features)
        n = rows.numel()
        lengths = features.lengths()
        one_hot = n == f * b and bool((lengths == 1).all())
        # bag of each id, key-major: id i is bag i when every bag holds one id (Criteo)
        bag = None if one_hot else torch.repeat_interleave(
            torch.arange(f * b, device=rows.device), lengths, output_size=n
        )
        # Each width group's ids looked up in its fused table, one bag per id (the kernel's
        # one-hot path: the update sums a row's gradients), summed into their bags: full-width
        # rows straight into `out` (batch-major, as the output), narrow ones into their columns
        # of `narrow` (feature-major, for the projection's bmm).
        out, narrow = None, []
        for g, (w, tables) in enumerate(zip(self.widths, self.width_tables)):
            ids = (group == g).nonzero().squeeze(1)
            into = ids if one_hot else bag.index_select(0, ids)  # key-major bags: feature * B + row
            if w == dim:
                into = (into % b) * f + into // b  # batch-major: row * F + feature
            pooled = rows.new_zeros((f * b, w), dtype=torch.float32)
            if ids.numel():  # (fbgemm's kernel takes no empty batch)
                got = tables(rows.index_select(0, ids), torch.arange(ids.numel() + 1, device=rows.device))  # [n_g, w]
                pooled = pooled.index_add(0, into, got)
            if w == dim:
                out = pooled
            else:
                narrow.append(pooled)
        out = out.view(b, f, dim) if out is not None else rows.new_zeros((b, f, dim), dtype=torch.float32)
        if narrow:
            stacked = torch.cat(list(self.projections.values()))  # [sum of narrow widths over tables, dim]
            padded = stacked.new_zeros((f * self.span, dim)).index_copy(0, self.projection_rows, stacked)
            projected = torch.bmm(torch.cat(narrow, 1).view(f, b, self.span), padded.view(f, self.span, dim))
            out = out + projected.transpose(0, 1)  # [B, F, dim]
        if self.pooling == "mean" and not one_hot:
            out = out / lengths.view(f, b).t().clamp(min=1).unsqueeze(2).to(out.dtype)
        values = out.reshape(b, f * dim)  # [B, F * dim]
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=values)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer] if self._optimizer is not None else []

    def embedding_bytes(self) -> int:
        """Block tables with their fused optimizer state, the head-id index (bitmap words and
        their ranks, 8 bytes per 32 ids of a table with head blocks; 5 bytes per head id), the
        projections and their optimizer state."""
        total = sum(tbe_bytes(m) for m in self.width_tables)
        total += sum(b.numel() * b.element_size() for b in (self.head_bits, self.head_rank, self.head_row, self.head_group))
        state = self._optimizer.state if self._optimizer is not None else {}
        for p in self.projections.values():
            total += p.numel() * p.element_size()
            for s in state.get(p, {}).values():
                if torch.is_tensor(s):
                    total += s.numel() * s.element_size()
        return total

    def describe(self) -> str:
        """Per table, e.g. `t_C3: mde 10131227 rows: the 179,576 most frequent ids 16 wide, the
        rest 8 wide (narrow rows projected to 16)`."""
        lines = []
        for t in self.tables:
            sizes, dims = self.block_rows[t.name][:-1], self.block_dims[t.name]
            if not sizes:
                lines.append(f"{t.name}: mde {t.rows} rows, all {dims[0]} wide")
                continue
            blocks = [f"the {sizes[0]:,} most frequent ids {dims[0]} wide"]
            blocks += [f"the next {n:,} {d} wide" for n, d in zip(sizes[1:], dims[1:-1])]
            blocks.append(f"the rest {dims[-1]} wide")
            lines.append(f"{t.name}: mde {t.rows} rows: {', '.join(blocks)} (narrow rows projected to {t.dim})")
        return "\n".join(lines)


def _popcount32(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each value of `x` (int64 in [0, 2^32)): the SWAR popcount (torch has no
    popcount op)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


def _stacked_identity(dims: list[int], dim: int, device: torch.device) -> torch.Tensor:
    """[sum(dims), dim]: each narrow block's [I | 0] projection, stacked."""
    return torch.cat([torch.eye(d, dim, device=device) for d in dims])


def _dims_overrides(given, tables: list[TableSpec]) -> dict[str, list[int]]:
    """`emb.dims: {feature: [d0, d1, ...]}` keyed by table name; unknown names are an error."""
    given = OmegaConf.to_container(given) if isinstance(given, DictConfig) else (given or {})
    out = {}
    for name, dims in given.items():
        t = resolve_table(str(name), tables, f"emb.dims.{name}")
        if t is None:
            raise ValueError(
                f"emb.dims.{name}: no mde-compressed table or feature of that name (tables under "
                "emb.min_rows stay full: name them in emb.tables to compress them)"
            )
        if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"emb.dims.{name}={dims!r}: must be a list of integer widths, one per block")
        out[t.name] = dims
    return out

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
optimizer state). Each block is a plain fbgemm table
(fused updates, as emb=full) of its own width, followed by a learned projection P_k
[d_k, dim] (initialized to [I | 0], so at equal widths MDE starts as a plain table); the pooled
output of a bag is sum over its ids of e_id P_block(id), computed per block after fbgemm pools.

Rows. Blocks 0..K-2 are numbered by the sorted ids they hold (a binary search over one sorted
int64 key buffer plus an int64 code per id: 16 bytes per head id); the last block is indexed by
the id itself (a table of `rows` rows at width d_{K-1}, whose rows of head ids go unused: at most
rows^((K-1)/K) rows), so the index costs nothing for the tail. `embedding_bytes` counts all of it,
plus the projections and their optimizer state (`emb.optimizer`, stepped by `optimizers()` like
TT's cores; the trainer's dense optimizer never sees them).

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

KEY_BITS = 40  # head ids are keyed table_index << 40 | id
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
    in [ALIGN, dim] per block of `bounds`."""
    if len(dims) != len(bounds) - 1 or not all(0 < d <= table.dim and d % ALIGN == 0 for d in dims):
        raise ValueError(
            f"emb.dims.{table.features[0]}={dims}: needs {len(bounds) - 1} widths, multiples of "
            f"{ALIGN} in [{ALIGN}, {table.dim}] (blocks of ranks {bounds})"
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
    rows), 16 bytes per head id, the [sum(dims), dim] projection (x2 with Adagrad's sum, plus its
    4-byte step)."""
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    table = sum(n * row_cost(d) for n, d in zip(sizes[:-1] + [rows], dims))
    proj = sum(dims) * dim * 4
    return table + 16 * sum(sizes[:-1]) + (2 * proj + 4 if proj_optimizer == "adagrad" else proj)


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
        if shared:  # virtual features are numbered feature-major, one feature per table
            raise ValueError(f"emb=mde: tables {shared} are shared by several features; mde takes one feature per table")
        big = [t.name for t in self.tables if t.rows >= 1 << KEY_BITS]
        if big:
            raise ValueError(f"emb=mde: tables {big} have 2^{KEY_BITS} rows or more")
        dims_given = _dims_overrides(cfg.dims, self.tables)

        source = counts_source(cfg.counts, runtime, self.name)
        self.block_rows: dict[str, list[int]] = {}  # physical rows per block (the last: all rows)
        self.block_dims: dict[str, list[int]] = {}
        physical, keys, codes = [], [], []
        for i, t in enumerate(self.tables):
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
            n_blocks = len(sizes)
            for k, (a, b) in enumerate(zip(bounds[:-2], bounds[1:-1])):  # head blocks only
                ids = order[a:b]
                keys.append(ids + (i << KEY_BITS))
                # rank of each id among its block's ids sorted by id, then the block: row * K + k
                codes.append(np.argsort(np.argsort(ids, kind="stable"), kind="stable") * n_blocks + k)
            physical += [
                TableSpec(f"{t.name}_b{k}", n, d, tuple(f"{f}_b{k}" for f in t.features))
                for k, (n, d) in enumerate(zip(self.block_rows[t.name], dims))
            ]
        order = np.argsort(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
        self.register_buffer("head_keys", torch.from_numpy(np.concatenate(keys)[order] if keys else order).to(device))
        self.register_buffer("head_codes", torch.from_numpy(np.concatenate(codes)[order] if codes else order).to(device))
        # fbgemm sees virtual features f_b0, f_b1, ... in feature-major, block-minor order.
        self.physical_tables = physical
        # bags are pooled by fbgemm per block, projected, then summed (mean: divided).
        self.tbe = fused_tables(physical, optim, "sum", device, cfg.weights_precision)
        with torch.no_grad():  # every block at its logical table's init bound, 1 / sqrt(rows)
            logical_rows = [t.rows for t in self.tables for _ in self.block_dims[t.name]]
            for w, n in zip(self.tbe.split_embedding_weights(), logical_rows):
                init_uniform_(w, n)

        self.projections = nn.ParameterDict(
            {
                t.name: nn.Parameter(_stacked_identity(self.block_dims[t.name], t.dim, device))
                for t in self.tables
            }
        )
        self.optimizer_name = cfg.optimizer
        params = list(self.projections.parameters())
        if self.optimizer_name == "adagrad":
            self._optimizer = torch.optim.Adagrad(params, lr=float(cfg.lr), eps=float(cfg.eps), fused=True)
        else:
            self._optimizer = torch.optim.SGD(params, lr=float(cfg.lr), fused=True)

        # Per feature: its table's key offset, number of blocks, first virtual feature.
        self.table_of_feature = [i for i, t in enumerate(self.tables) for _ in t.features]
        n_blocks = [len(self.block_dims[t.name]) for t in self.tables]
        first, acc = [], 0
        for i in self.table_of_feature:
            first.append(acc)
            acc += n_blocks[i]
        self.n_virtual = acc
        self.register_buffer(
            "feature_params",
            torch.tensor(
                [[i << KEY_BITS, n_blocks[i], first[j]] for j, i in enumerate(self.table_of_feature)],
                dtype=torch.int64, device=device,
            ),
        )
        self.check_ids = cfg.check_ids

    def _route(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows in value order, virtual feature of each id, global bag of each id)."""
        values = features.values()
        lengths = features.length_per_key()
        p = self.feature_params.repeat_interleave(
            torch.tensor(lengths, device=values.device), dim=0, output_size=values.numel()
        )
        keys = values + p[:, 0]
        if len(self.head_keys):
            pos = torch.searchsorted(self.head_keys, keys).clamp(max=len(self.head_keys) - 1)
            hit = self.head_keys[pos] == keys
            code = self.head_codes[pos]
            block = torch.where(hit, code % p[:, 1], p[:, 1] - 1)
            rows = torch.where(hit, code // p[:, 1], values)
        else:
            block, rows = p[:, 1] - 1, values
        return rows, p[:, 2] + block

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        b, f = features.stride(), len(self.features)
        rows, virtual = self._route(features)
        device = rows.device
        bag = torch.repeat_interleave(
            torch.arange(f * b, device=device), features.lengths(), output_size=rows.numel()
        ) % b
        # Group ids by virtual feature (feature-major, block-minor), keeping bag order within.
        slot = virtual * b + bag
        slot_sorted, order = torch.sort(slot, stable=True)
        counts = torch.bincount(slot_sorted, minlength=self.n_virtual * b)
        offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
        pooled = self.tbe(rows[order], offsets)  # [B, sum of block widths over features]
        projections = [self.projections[self.tables[i].name] for i in self.table_of_feature]
        # split (not slicing): its backward concatenates, where slices would zero-fill a
        # pooled-sized gradient per feature
        blocks = pooled.split([p.shape[0] for p in projections], dim=1)
        out = torch.cat([x @ p for x, p in zip(blocks, projections)], dim=1)  # [B, F * dim]
        if self.pooling == "mean":
            n = features.lengths().view(f, b).t().clamp(min=1).to(out.dtype)  # [B, F]
            out = (out.view(b, f, -1) / n.unsqueeze(2)).reshape(b, -1)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=out)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def embedding_bytes(self) -> int:
        """Block tables with their fused optimizer state, the head-id index (16 bytes per head id),
        the projections and their optimizer state."""
        total = tbe_bytes(self.tbe)
        total += sum(b.numel() * b.element_size() for b in (self.head_keys, self.head_codes))
        for p in self.projections.values():
            total += p.numel() * p.element_size()
            for s in self._optimizer.state.get(p, {}).values():
                if torch.is_tensor(s):
                    total += s.numel() * s.element_size()
        return total

    def describe(self) -> str:
        return "\n".join(
            f"{t.name}: mde {t.rows} rows, blocks of {self.block_rows[t.name][:-1]} hot ids + all "
            f"ids, widths {self.block_dims[t.name]} -> {t.dim}"
            for t in self.tables
        )


def _stacked_identity(dims: list[int], dim: int, device: torch.device) -> torch.Tensor:
    """[sum(dims), dim]: each block's [I | 0] projection, stacked."""
    return torch.cat([torch.eye(d, dim, device=device) for d in dims])


def _dims_overrides(given, tables: list[TableSpec]) -> dict[str, list[int]]:
    """`emb.dims: {feature: [d0, d1, ...]}` keyed by table name; unknown names are an error."""
    given = OmegaConf.to_container(given) if isinstance(given, DictConfig) else (given or {})
    out = {}
    for name, dims in given.items():
        t = resolve_table(str(name), tables, f"emb.dims.{name}")
        if t is None:
            raise ValueError(f"emb.dims.{name}: no mde-compressed table or feature of that name")
        if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"emb.dims.{name}={dims!r}: must be a list of integer widths, one per block")
        out[t.name] = dims
    return out

"""`emb=qr`: quotient-remainder compositional embeddings (Shi et al., KDD 2020).

Id x of a table with `rows` rows looks up row `x % m` of a remainder table (m rows) and row
`x // m` of a quotient table (ceil(rows / m) rows); no two ids in range share both rows, so
every id keeps a unique embedding. The two rows are combined by `emb.combiner`:

- `mult` (default): elementwise product. The quotient table starts at 1, so the model starts as
  the hashing trick (`x % m`) and learns a per-block rescaling;
- `add`: sum. The quotient table starts at 0, for the same reason;
- `concat`: each table has dim/2 columns, so the output stays `dim` wide.

Sizing. `compression` c means "about rows / c rows of dim columns", as for `emb=hashed`, so the
two use about the same memory at one setting. With T = rows / c * (dim / table width), i.e. twice
as many half-width rows for concat, m is the larger root of m + rows / m = T:

    m = ceil((T + sqrt(T^2 - 4 rows)) / 2)       m + ceil(rows / m) <= T + 2

so the remainder table is about a hashed table's size and the quotient table small (~c rows).
If T^2 < 4 rows (a table smaller than 4 c^2 rows), no m reaches c; m = ceil(sqrt(rows)) then gives
the fewest rows QR can (2 sqrt(rows)) and a warning says so. `emb.m: {C3: 5000}` overrides.

Pooling. Per bag, combine per id, then pool: sum_i q_i * r_i is not (sum q_i) * (sum r_i). For
`add` and `concat` the two orders agree, so both tables are pooled inside fbgemm's kernel. For
`mult` with multi-hot bags, each id is looked up on its own (a pooled lookup of one-id bags),
multiplied, then summed per bag with `index_add`; single-hot batches skip that (a bag of one id
pooled is the row itself).

Example::

    tables = [TableSpec("t_C3", rows=1_000_000, dim=16, features=("C3",))]
    emb = QREmbeddings(tables, OmegaConf.create({"compression": 16}), sparse_optim, cpu)
    emb.m, emb.quotient_rows        # [62484], [17]: 62501 rows, about 1_000_000 / 16
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.embeddings.base import Runtime, TableSpec, check_ids_in_range, per_table
from dlrm.embeddings.remap import REMAP_OPTIONS, RemappedTables, collision_stats, rates, table_overrides
from dlrm.options import Opt

log = logging.getLogger(__name__)

COMBINERS = ("mult", "add", "concat")


class PairProduct(torch.autograd.Function):
    """[..., 2, D] -> [..., D]: x[..., 0, :] * x[..., 1, :], for combiner=mult.

    Same values and gradients as the plain expression, but its backward writes both halves of
    the gradient into one buffer; autograd's zero-fills two input-sized buffers first, which the
    profiler showed as the largest cost outside fbgemm in a CPU step (2048 x 10 tables).
    """

    @staticmethod
    def forward(ctx, pairs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pairs)
        return pairs[..., 0, :] * pairs[..., 1, :]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (pairs,) = ctx.saved_tensors
        out = torch.empty_like(pairs)
        torch.mul(grad, pairs[..., 1, :], out=out[..., 0, :])
        torch.mul(grad, pairs[..., 0, :], out=out[..., 1, :])
        return out


def remainder_size(rows: int, compression: float, widen: float = 1.0) -> int:
    """m such that m + ceil(rows / m) is about rows / compression * widen (see module doc).

    >>> remainder_size(1_000_000, 16)
    62484
    """
    target = rows / compression * widen
    disc = target * target - 4 * rows
    if disc < 0:
        return min(rows, math.ceil(math.sqrt(rows)))
    return max(1, min(rows, math.ceil((target + math.sqrt(disc)) / 2)))


class QREmbeddings(RemappedTables):
    """Quotient-remainder tables: id x -> combine(Q[x // m], R[x % m]).

    The id transform (`remap`: x -> x // m, x % m) feeds one plain TBE holding both tables per
    compressed table (`physical_tables`); `forward` then combines the two rows."""

    name = "qr"
    options = {**REMAP_OPTIONS, "combiner": Opt(str, choices=COMBINERS), "m": Opt(dict, nullable=True)}

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
        self.combiner = cfg.combiner
        shared = [t.name for t in self.tables if len(t.features) != 1]
        if shared:  # the per-feature [Q, R] layout below assumes one feature per table
            raise ValueError(f"emb=qr: tables {shared} are shared by several features; qr takes one feature per table")
        dims = {t.dim for t in self.tables}
        if len(dims) != 1:
            raise ValueError(f"emb=qr needs one dim for all its tables, got {sorted(dims)}")
        self.dim = dims.pop()
        if self.combiner == "concat" and self.dim % 2:
            raise ValueError(f"emb.dim={self.dim}: combiner=concat splits it in halves, so it must be even")
        self.width = self.dim // 2 if self.combiner == "concat" else self.dim

        compression = float(cfg.compression)
        overrides = table_overrides(cfg.m, "m", self.tables)
        self.m = []
        for t in self.tables:
            if t.name in overrides and overrides[t.name] > t.rows:
                raise ValueError(f"emb.m.{t.name}={overrides[t.name]}: larger than the table ({t.rows} rows)")
            m = overrides.get(t.name) or remainder_size(t.rows, compression, self.dim / self.width)
            if t.name not in overrides and (t.rows / compression) ** 2 * (self.dim / self.width) ** 2 < 4 * t.rows:
                log.warning(
                    "%s: %d rows is too few for QR to reach compression %g; using m=%d (%d rows)",
                    t.name, t.rows, compression, m, m + math.ceil(t.rows / m),
                )
            self.m.append(m)
        self.quotient_rows = [math.ceil(t.rows / m) for t, m in zip(self.tables, self.m)]

        # One TBE for both; per feature its quotient then its remainder (virtual features f_q, f_r),
        # so a pooled lookup is [B, F, 2, width]: for concat that already is the output.
        self.physical_tables = [
            TableSpec(f"{t.name}_{part}", n, self.width, tuple(f"{f}_{part}" for f in t.features))
            for t, q, m in zip(self.tables, self.quotient_rows, self.m)
            for part, n in (("q", q), ("r", m))
        ]
        self.pooling = cfg.pooling
        # mult pools after combining (in forward), so its lookups must not average.
        self.build_tables(optim, "sum" if self.combiner == "mult" else self.pooling, device, cfg.weights_precision)
        if self.combiner in ("mult", "add"):
            with torch.no_grad():
                for w in self.tbe.split_embedding_weights()[0::2]:
                    w.fill_(1.0 if self.combiner == "mult" else 0.0)

        self.check_ids = cfg.check_ids
        self.m_of_feature = [m for t, m in zip(self.tables, self.m) for _ in t.features]
        self.register_buffer("m_per_feature", torch.tensor(self.m_of_feature, device=device))
        self._last: KeyedJaggedTensor | None = None

    def split_ids(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Ids in the TBE's order: per feature (keys = self.features), all x // m then all x % m."""
        lengths = features.length_per_key()
        values = features.values()
        if len(set(lengths)) == 1:  # e.g. single-hot: one vectorized op per part
            x = values.view(len(lengths), -1)
            m = self.m_per_feature.unsqueeze(1)
            return torch.stack([x // m, x % m], dim=1).reshape(-1)
        parts = []
        for x, m in zip(values.split(lengths), self.m_of_feature):
            parts += [x // m, x % m]
        return torch.cat(parts)

    def remap(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the [Q, R] table pairs and the offsets of a pooled lookup: each virtual
        feature (f_q, f_r) has its feature's bags."""
        f, b = len(self.features), features.stride()
        per_part = features.lengths().view(f, 1, b).expand(f, 2, b).reshape(-1)
        return self.split_ids(features), torch.nn.functional.pad(per_part.cumsum(0), (1, 0))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        if self.training:  # stats describe the last training batch, not an eval batch
            self._last = features
        n, f, b = features.values().numel(), len(self.features), features.stride()
        lengths = features.lengths()
        if self.combiner == "mult" and not (n == f * b and bool((lengths == 1).all())):
            out = self._mult_multi_hot(self.split_ids(features), features.length_per_key(), lengths, b)
        else:
            pooled = self.tbe(*self.remap(features)).view(b, f, 2, self.width)
            if self.combiner == "mult":
                out = PairProduct.apply(pooled)
            elif self.combiner == "add":
                out = pooled.sum(dim=2)
            else:  # concat: per feature [Q row, R row] is already the layout
                out = pooled
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=out.reshape(b, -1))

    def _mult_multi_hot(
        self, ids: torch.Tensor, length_per_key: list[int], lengths: torch.Tensor, b: int
    ) -> torch.Tensor:
        """[B, F, dim]: per-id Q * R rows, then pooled per bag."""
        n, f, device = len(ids) // 2, len(length_per_key), ids.device
        if n == 0:
            return torch.zeros(b, f, self.dim, device=device)
        # Look every id up alone: the k-th id of virtual feature g is bag k of g (TBE wants one
        # bag count for all features, so the shorter ones get empty bags up to the longest).
        count = torch.tensor(length_per_key, device=device).repeat_interleave(2)
        start = count.cumsum(0) - count
        width = max(length_per_key)
        k = torch.arange(width, device=device)
        offsets = start[:, None] + torch.minimum(k[None, :], count[:, None])
        rows = self.tbe(ids, torch.cat([offsets.reshape(-1), torch.tensor([2 * n], device=device)]))
        rows = rows.view(width * 2 * f, self.width)  # row k * 2F + g: k-th id of virtual feature g
        feature = torch.repeat_interleave(
            torch.arange(f, device=device), count[0::2], output_size=n
        )  # of each id, in value order
        j = torch.arange(n, device=device) - start[0::2][feature] // 2  # position within its feature
        prod = rows[j * (2 * f) + 2 * feature] * rows[j * (2 * f) + 2 * feature + 1]
        bag = torch.repeat_interleave(torch.arange(f * b, device=device), lengths, output_size=n)
        pooled = torch.zeros(f * b, self.dim, device=device, dtype=prod.dtype).index_add(0, bag, prod)
        if self.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        return pooled.view(f, b, self.dim).transpose(0, 1)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Of the last training batch: collision_rate (share of its distinct ids that share their
        remainder row with another of its distinct ids, the collisions the quotient row then
        tells apart; comparable to emb=hashed's) and rows_touched (distinct rows of both tables)."""
        if self._last is None:
            return {}
        distinct = collided = touched = 0
        for i, (_, ids, _) in enumerate(per_table(self.tables, self._last)):
            d, c, r_rows = collision_stats(ids, ids % self.m[i])
            distinct, collided = distinct + d, collided + c
            touched += r_rows + torch.unique(ids // self.m[i]).numel()
        return rates(distinct, collided, touched)

    def describe(self) -> str:
        return "\n".join(
            f"{t.name}: qr-{self.combiner} {t.rows} -> {q} + {m} rows x {self.width} "
            f"({t.rows / (q + m) * self.dim / self.width:.1f}x)"
            for t, q, m in zip(self.tables, self.quotient_rows, self.m)
        )


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
the fewest rows QR can (2 sqrt(rows)) and a warning says so. `emb.m: {t_C3: 5000}` overrides.

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

from dlrm.embeddings.base import EmbeddingBackend, TableSpec, check_ids_in_range
from dlrm.embeddings.full import fused_tables, tbe_bytes
from dlrm.embeddings.hashed import check_compression, collision_stats, table_overrides
from dlrm.embeddings.registry import register

log = logging.getLogger(__name__)

COMBINERS = ("mult", "add", "concat")


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


class QREmbeddings(EmbeddingBackend):
    """Quotient-remainder tables: id x -> combine(Q[x // m], R[x % m])."""

    name = "qr"

    def __init__(
        self, tables: list[TableSpec], cfg: DictConfig, optim: DictConfig, device: torch.device
    ) -> None:
        super().__init__(tables)
        self.combiner = cfg.get("combiner", "mult")
        if self.combiner not in COMBINERS:
            raise ValueError(f"emb.combiner={self.combiner!r}: choose one of {list(COMBINERS)}")
        dims = {t.dim for t in self.tables}
        if len(dims) != 1:
            raise ValueError(f"emb=qr needs one dim for all its tables, got {sorted(dims)}")
        self.dim = dims.pop()
        if self.combiner == "concat" and self.dim % 2:
            raise ValueError(f"emb.dim={self.dim}: combiner=concat splits it in halves, so it must be even")
        self.width = self.dim // 2 if self.combiner == "concat" else self.dim

        compression = check_compression(cfg)
        overrides = table_overrides(cfg, "m", self.tables)
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

        # One TBE for both: the quotient tables' virtual features first, then the remainder ones,
        # matching the lookup order cat([x // m, x % m]).
        specs = [
            TableSpec(f"{t.name}_q", q, self.width, tuple(f"{f}_q" for f in t.features))
            for t, q in zip(self.tables, self.quotient_rows)
        ] + [
            TableSpec(f"{t.name}_r", m, self.width, tuple(f"{f}_r" for f in t.features))
            for t, m in zip(self.tables, self.m)
        ]
        self.pooling = cfg.get("pooling", "sum")
        # mult pools after combining (in forward), so its lookups must not average.
        self.tbe = fused_tables(specs, optim, "sum" if self.combiner == "mult" else self.pooling, device)
        if self.combiner in ("mult", "add"):
            with torch.no_grad():
                for w in self.tbe.split_embedding_weights()[: len(self.tables)]:
                    w.fill_(1.0 if self.combiner == "mult" else 0.0)

        self.check_ids = cfg.get("check_ids", True)
        table_of_feature = [i for i, t in enumerate(self.tables) for _ in t.features]
        self.register_buffer("table_of_feature", torch.tensor(table_of_feature, device=device))
        self.register_buffer("m_of_feature", torch.tensor([self.m[i] for i in table_of_feature], device=device))
        self.register_buffer("q_offset", torch.tensor([0] + self.quotient_rows[:-1], device=device).cumsum(0))
        self.register_buffer("r_offset", torch.tensor([0] + self.m[:-1], device=device).cumsum(0))
        self._last: tuple[torch.Tensor, list[int], torch.Tensor] | None = None

    def split_ids(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """cat([x // m, x % m]) over all ids of `features` (keys = self.features), in value order."""
        lengths = features.length_per_key()
        values = features.values()
        if len(set(lengths)) == 1:
            m = self.m_of_feature.unsqueeze(1)
            x = values.view(len(lengths), -1)
        else:
            m = self.m_of_feature.repeat_interleave(
                torch.tensor(lengths, device=values.device), output_size=values.numel()
            )
            x = values
        return torch.cat([(x // m).reshape(-1), (x % m).reshape(-1)])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.check_ids:
            check_ids_in_range(features, self.tables)
        ids = self.split_ids(features)
        self._last = (features.values(), features.length_per_key(), ids)
        n, f, b = features.values().numel(), len(self.features), features.stride()
        lengths = features.lengths()
        if self.combiner == "mult" and not (n == f * b and bool((lengths == 1).all())):
            out = self._mult_multi_hot(ids, features.length_per_key(), lengths, b)
        else:
            offsets = features.offsets()
            pooled = self.tbe(ids, torch.cat([offsets[:-1], offsets + n]))
            q, r = pooled.view(b, 2, f, self.width).unbind(1)
            if self.combiner == "mult":
                out = q * r
            elif self.combiner == "add":
                out = q + r
            else:
                out = torch.cat([q, r], dim=-1)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=out.reshape(b, -1))

    def _mult_multi_hot(
        self, ids: torch.Tensor, length_per_key: list[int], lengths: torch.Tensor, b: int
    ) -> torch.Tensor:
        """[B, F, dim]: per-id Q * R rows, then pooled per bag."""
        n, f = len(ids) // 2, len(length_per_key)
        if n == 0:
            return torch.zeros(b, f, self.dim, device=ids.device)
        # One-id bags: virtual feature g's k-th id is bag k of g; features with fewer ids get empty
        # bags up to the longest one (TBE wants one batch size for all features).
        device = ids.device
        count = torch.tensor(length_per_key * 2, device=device)
        start = torch.cumsum(count, 0) - count
        width = max(length_per_key)
        offsets = start[:, None] + torch.minimum(torch.arange(width, device=device)[None, :], count[:, None])
        rows = self.tbe(ids, torch.cat([offsets.reshape(-1), torch.tensor([2 * n], device=device)]))
        g = torch.repeat_interleave(torch.arange(2 * f, device=device), count, output_size=2 * n)
        k = torch.arange(2 * n, device=device) - start[g]
        per_id = rows.view(width * 2 * f, self.width)[k * (2 * f) + g]
        prod = per_id[:n] * per_id[n:]
        bag = torch.repeat_interleave(torch.arange(f * b, device=device), lengths, output_size=n)
        pooled = torch.zeros(f * b, self.dim, device=device, dtype=prod.dtype).index_add(0, bag, prod)
        if self.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        return pooled.view(f, b, self.dim).transpose(0, 1)

    def embedding_bytes(self) -> int:
        return tbe_bytes(self.tbe)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Of the last batch: collision_rate (share of its distinct ids that share their
        remainder row with another of its distinct ids, the collisions the quotient row then
        tells apart; comparable to emb=hashed's) and rows_touched (distinct rows of both tables)."""
        if self._last is None or self._last[0].numel() == 0:
            return {}
        values, lengths, ids = self._last
        n = values.numel()
        table = self.table_of_feature.repeat_interleave(
            torch.tensor(lengths, device=values.device), output_size=n
        )
        distinct, collided, r_rows = collision_stats(table, values, ids[n:] + self.r_offset[table])
        q_rows = torch.unique(ids[:n] + self.q_offset[table]).numel()
        return {"collision_rate": collided / distinct, "rows_touched": float(q_rows + r_rows)}

    def describe(self) -> str:
        return "\n".join(
            f"{t.name}: qr-{self.combiner} {t.rows} -> {q} + {m} rows x {self.width} "
            f"({t.rows / (q + m) * self.dim / self.width:.1f}x)"
            for t, q, m in zip(self.tables, self.quotient_rows, self.m)
        )


register("qr", QREmbeddings)

"""`emb=tt`: tables stored as tensor-train cores (TT-Rec, Yin et al., MLSys 2021).

Each table the policy hands us (rows >= emb.min_rows, or those in emb.tables) becomes `cores`
small dense tensors; row i is the product of one slice per core (see tt_kernels.py). The rest of
the tables stay `full`. The cores are ordinary parameters stepped by the optimizer that
`optimizers()` returns (Adagrad by default): they are a few MB, so a dense step is cheap. Under
the C kernels the middle cores' step runs inside backward instead (`core_update`), as fbgemm's
fused tables do, except under torchrun, where DDP all-reduces the gradients first.

No fbgemm: on CPU the lookup runs our C kernels (tt_native.py, built on first use; `emb.kernel`),
elsewhere PyTorch ops (tt_autograd.py), so the same module runs on CPU and CUDA.

Example::

    cfg = OmegaConf.create({"name": "tt", "dim": 16, "pooling": "sum", "rank": 32, "cores": 3,
                            "min_rows": 100000, "optimizer": "adagrad", "lr": 0.01})
    emb = build_embeddings([TableSpec("t_C3", 10_131_227, 16, ("C3",))], cfg, optim, cpu)
    emb.describe()  # t_C3: tt 10131227 x 16 -> rows [216, 217, 217] ... ranks [1, 32, 32, 1] ...
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm import distributed
from dlrm.embeddings.base import (
    EmbeddingBackend,
    Runtime,
    TableSpec,
    check_ids_in_range,
    per_table,
)
from dlrm.embeddings.policy import POLICY_OPTIONS, resolve_table
from dlrm.embeddings.tt_kernels import (
    TTShape,
    init_cores,
    pool,
    tt_rows,
    tt_rows_from_keys,
    tt_rows_multi,
    tt_shape,
)
from dlrm.embeddings.tt_native import KERNELS, CoreUpdate, unique_keys, use_native
from dlrm.options import Opt

OPTIMIZERS = ("adagrad", "sgd")
# The TT settings proper (also the keys of emb.tt under emb=cached emb.store=tt).
TT_OPTIONS: dict[str, Opt] = {
    "rank": Opt(int, min=1),
    "ranks": Opt(list, nullable=True),
    "cores": Opt(int, min=2),
    "shapes": Opt(dict, nullable=True),
    "optimizer": Opt(str, choices=OPTIMIZERS),
    "lr": Opt(float, min=0),
    "eps": Opt(float, min=0),
    "kernel": Opt(str, choices=KERNELS),
}
SHAPE_KEYS = {"rows", "dims", "ranks"}


def table_shapes(tables: list[TableSpec], cfg: DictConfig) -> dict[str, TTShape]:
    """TT shape per table from the emb config: automatic factors unless emb.shapes overrides.

    emb.shapes maps a feature (or, deprecated, a table name) to any of
    {rows: [...], dims: [...], ranks: [...]}.
    """
    overrides = cfg.shapes or {}
    if not isinstance(overrides, (dict, DictConfig)):
        raise ValueError(f"emb.shapes must map table names to shapes, got {overrides!r}")
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides)
    by_table = {n: resolve_table(str(n), tables, f"emb.shapes.{n}") for n in overrides}
    unknown = [n for n, t in by_table.items() if t is None]
    if unknown:
        raise ValueError(
            f"emb.shapes names {unknown}, which are not TT-compressed tables "
            f"(compressed: {[t.features[0] for t in tables]}; see emb.min_rows / emb.tables)"
        )
    ranks = cfg.ranks
    shapes = {}
    for t in tables:
        entry = next((overrides[n] for n, owner in by_table.items() if owner is t), {}) or {}
        bad = set(entry) - SHAPE_KEYS
        if bad:
            raise ValueError(
                f"emb.shapes.{t.name}: unknown keys {sorted(bad)}; use {sorted(SHAPE_KEYS)}"
            )
        shapes[t.name] = tt_shape(
            t.rows,
            t.dim,
            cores=int(cfg.cores),
            rank=int(cfg.rank),
            ranks=entry.get("ranks", ranks),
            row_factors=entry.get("rows"),
            dim_factors=entry.get("dims"),
            name=t.name,
        )
    return shapes


class TTEmbeddings(EmbeddingBackend):
    """TT-compressed tables: lookups through tt_kernels, cores stepped by `optimizers()`."""

    name = "tt"
    options = {**POLICY_OPTIONS, **TT_OPTIONS}

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
        self.shapes = table_shapes(self.tables, cfg)
        # One ParameterList per table, so state_dict keys read cores.t_C3.0, cores.t_C3.1, ...
        self.cores = nn.ModuleDict(
            {
                t.name: nn.ParameterList(
                    nn.Parameter(c) for c in init_cores(self.shapes[t.name], device=device)
                )
                for t in self.tables
            }
        )
        self.optimizer_name = cfg.optimizer
        self.kernel = cfg.kernel
        # emb.kernel=native: fail here, naming why, not at the first batch
        use_native(self.kernel, next(self.cores.parameters()))
        lr = float(cfg.lr)
        params = list(self.cores.parameters())
        # fused: one pass per tensor; for the 7 Kaggle tables at rank 32 (2.3M entries) the fused
        # Adagrad step measured 1.2 ms vs 3.9 ms for the default loop on one CPU thread.
        if self.optimizer_name == "adagrad":
            eps = float(cfg.eps)
            self._optimizer = torch.optim.Adagrad(params, lr=lr, eps=eps, fused=True)
        else:
            self._optimizer = torch.optim.SGD(params, lr=lr, fused=True)
        self._checked_keys = False
        # One lookup for all tables when their TT shapes allow stacking the cores (the default:
        # one rank, cores and dim for all); else one per table.
        shapes = [self.shapes[t.name] for t in self.tables]
        self._fused = len({(s.cores, s.dim_factors, s.ranks) for s in shapes}) == 1
        self._stacked: list[torch.Tensor] = []  # fused: per core, every table's core stacked
        self._aliases: list[tuple[nn.Parameter, int]] = []  # (core, where it must start in _stacked)
        self._stacked_states: list[torch.Tensor] = []  # adagrad: per core, the tables' `sum` stacked
        self._state_aliases: list[tuple[nn.Parameter, int]] = []  # (core, where its `sum` must start)
        owner = [i for i, t in enumerate(self.tables) for _ in t.features]
        # buffers (not state): they follow the module to its device, checkpoints do not hold them
        self.register_buffer("_feature_table", torch.tensor(owner, device=device), persistent=False)  # [F]
        rows = torch.tensor([t.rows for t in self.tables], device=device)
        self.register_buffer("_table_rows", rows, persistent=False)  # [T]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not self._checked_keys:
            if features.keys() != self.features:
                raise ValueError(
                    f"TT tables expect features {self.features}, got {features.keys()}"
                )
            self._checked_keys = True
        # Cores stay fp32 even if a caller wraps us in autocast (bmm would otherwise drop to bf16).
        with torch.autocast(features.values().device.type, enabled=False):
            return self._lookup(features)

    def _lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self._fused:
            return self._lookup_fused(features)
        batch = features.stride()
        blocks = []
        for t, ids, bag_offsets in per_table(self.tables, features):
            n = len(t.features)
            uid, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            # Sorted distinct ids make the range check two comparisons. TT must never see an
            # id >= rows: it would silently read a padded (or, past the padding, wrapped) row.
            if uid.numel() and bool((uid[0] < 0) | (uid[-1] >= t.rows)):
                check_ids_in_range(features, self.tables)  # raises, naming the feature
                raise ValueError(f"{t.name}: ids outside [0, {t.rows})")
            rows = self.rows(t.name, uid)
            pooled = pool(rows, inverse, bag_offsets, self.pooling)  # [n * batch, dim]
            if n == 1:
                blocks.append(pooled)
            else:  # features sharing a table: [n, B, D] -> n blocks of [B, D]
                blocks.extend(pooled.view(n, batch, t.dim).unbind(0))
        values = torch.cat(blocks, 1)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=values)

    def _lookup_fused(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """All tables in one lookup (tt_rows_multi): one unique over `table * stride + id`, one
        plan, one GEMM per core for the whole batch, instead of ~40 small ops per table (each an
        OpenMP region: the per-table loop was most of TT's step on 2 cores)."""
        ids = features.values().long()
        stride = int(self._table_rows.max())
        shapes = [self.shapes[t.name] for t in self.tables]
        cores = [list(self.cores[t.name]) for t in self.tables]
        # TT must never see an id >= rows: it would silently read a padded (or wrapped) row.
        if use_native(self.kernel, cores[0][0]):  # keys, range check and unique in one C pass
            try:
                keys, inverse = unique_keys(
                    ids, features.length_per_key(), self._feature_table, self._table_rows, stride
                )
            except IndexError:
                check_ids_in_range(features, self.tables)  # raises, naming the feature
                raise
            rows = tt_rows_from_keys(cores, shapes, keys, stride, self.stacked_cores(), self.core_update())
        else:
            lengths = torch.tensor(features.length_per_key(), device=ids.device)
            table = torch.repeat_interleave(self._feature_table, lengths, output_size=ids.numel())
            if ids.numel() and bool((ids.lt(0) | ids.ge(self._table_rows.index_select(0, table))).any()):
                check_ids_in_range(features, self.tables)  # raises, naming the feature
                raise ValueError(f"TT ids outside their tables' rows {self._table_rows.tolist()}")
            keys, inverse = torch.unique(table * stride + ids, sorted=True, return_inverse=True)
            rows = tt_rows_multi(
                cores, shapes, keys // stride, keys % stride, stacked=self.stacked_cores(), kernel=self.kernel
            )
        pooled = pool(rows, inverse, features.offsets(), self.pooling)  # [F * B, D], key-major
        batch, dim = features.stride(), shapes[0].dim
        width = len(self.features) * dim  # explicit: an empty batch (a rank's share) has B = 0
        values = pooled.view(len(self.features), batch, dim).transpose(0, 1).reshape(batch, width)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=values)

    def stacked_cores(self) -> list[torch.Tensor]:
        """Per core k, `[sum of the tables' p_k, r, q, r']`: every table's core k stacked, each
        table's core parameter a view of its rows there, so a fused lookup reads them without
        concatenating 2.3M floats per step (Kaggle, rank 32), and the fused optimizer steps them
        in place. Re-stacked (once, a copy) whenever a core stopped aliasing its rows, e.g.
        after `module.to(other device)` or a `param.data = ...` replaced it."""
        if self._aliases and all(p.data_ptr() == ptr for p, ptr in self._aliases):
            return self._stacked
        per_table = [list(self.cores[t.name]) for t in self.tables]
        with torch.no_grad():
            self._stacked, views = _stack([[c.detach() for c in cores] for cores in per_table])
        for cores, table_views in zip(per_table, views):
            for core, view in zip(cores, table_views):
                core.data = view  # the parameter now lives in the stacked tensor
        self._aliases = [(core, core.data_ptr()) for cores in per_table for core in cores]
        return self._stacked

    def stacked_states(self) -> list[torch.Tensor]:
        """Adagrad's accumulators laid out like `stacked_cores()`: per core k every table's `sum`
        stacked, each core's optimizer state a view of its rows (re-stacked, values kept, when
        `load_state_dict` replaced them), for the update fused into the lookup's backward."""
        state = self._optimizer.state
        if self._state_aliases and all(state[p]["sum"].data_ptr() == ptr for p, ptr in self._state_aliases):
            return self._stacked_states
        per_table = [list(self.cores[t.name]) for t in self.tables]
        self._stacked_states, views = _stack([[state[c]["sum"] for c in cores] for cores in per_table])
        for cores, table_views in zip(per_table, views):
            for core, view in zip(cores, table_views):
                state[core]["sum"] = view
        self._state_aliases = [(c, state[c]["sum"].data_ptr()) for cores in per_table for c in cores]
        return self._stacked_states

    def core_update(self) -> CoreUpdate | None:
        """The cores' optimizer step fused into the lookup's backward (tt_native.CoreUpdate: the
        C kernels step the middle cores' touched slices in place; `optimizers()` steps the rest),
        or None where no backward follows (grad disabled: eval) or where the gradients must first
        be all-reduced across processes (torchrun: DistributedDataParallel replicates the cores)."""
        if not torch.is_grad_enabled() or distributed.active():
            return None
        group = self._optimizer.param_groups[0]
        if self.optimizer_name == "sgd":
            return CoreUpdate("sgd", float(group["lr"]))
        return CoreUpdate("adagrad", float(group["lr"]), float(group["eps"]), self.stacked_states())

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` ([n] int64, distinct, in range) of table `name` from its cores: [n, dim],
        differentiable with respect to the cores (call under no_grad to only read them)."""
        return tt_rows(list(self.cores[name]), self.shapes[name], ids, kernel=self.kernel)

    def table_bytes(self, table: TableSpec) -> int:
        """Cores of `table` plus the optimizer state kept for them."""
        total = 0
        for p in self.cores[table.name]:
            total += p.numel() * p.element_size()
            for s in self._optimizer.state.get(p, {}).values():
                if torch.is_tensor(s):
                    total += s.numel() * s.element_size()
        return total

    def embedding_bytes(self) -> int:
        return sum(self.table_bytes(t) for t in self.tables)

    def stats(self) -> dict[str, float]:
        return {
            f"tt_compression_{t.name}": t.full_bytes() / self.table_bytes(t) for t in self.tables
        }

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def describe(self) -> str:
        lines = [
            f"{t.name}: tt {t.rows} x {t.dim} -> {self.shapes[t.name]}, "
            f"{self.shapes[t.name].num_params:,} params, {self.table_bytes(t):,} bytes with "
            f"{self.optimizer_name} state ({t.full_bytes() / self.table_bytes(t):.0f}x smaller)"
            for t in self.tables
        ]
        native = use_native(self.kernel, next(self.cores.parameters()))
        lookups = "our C kernels (tt_native.py)" if native else "PyTorch ops (tt_autograd.py)"
        return "\n".join([*lines, f"TT lookups: {lookups}, emb.kernel={self.kernel}"])


def _stack(tables: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """`tables[t][k]` (table t's core k, or its state) concatenated per k along dim 0, and each
    one's view of its rows there (same shape, table-major order)."""
    stacked = [torch.cat([cores[k] for cores in tables]) for k in range(len(tables[0]))]
    views: list[list[torch.Tensor]] = [[] for _ in tables]
    for k, whole in enumerate(stacked):
        for t, part in enumerate(whole.split([cores[k].shape[0] for cores in tables])):
            views[t].append(part)
    return stacked, views

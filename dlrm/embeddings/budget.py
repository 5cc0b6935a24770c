"""`emb.budget`: one memory budget, and each method picks its own knobs to fit it.

The budget is a compression ratio over all embedding memory, parameters plus optimizer state, as
results.json's `compression_ratio` measures it: full_bytes / embedding_bytes, where full_bytes is
every table in fp32 with row-wise Adagrad state (`TableSpec.full_bytes`). The plan is computed from
table sizes (and, for mde, per-id counts) before anything is allocated, with the same byte formulas
the backends' `embedding_bytes` use (tests/test_budget.py checks plan == measured), then written
into the backend's own per-table knobs:

    hashed   buckets per table                   emb.buckets
    qr       remainder size m per table          emb.m
    hybrid   hot rows + hashed rows per table    emb.hot_rows, emb.buckets
    tt       TT rank per table                   emb.shapes.<f>.ranks
    mde      block widths per table              emb.dims
    fp16     which tables store fp16 rows        emb.tables
    (all)    which tables are compressed         emb.tables

Which tables: the backend's own policy first (emb.min_rows / emb.tables); when even those tables
at their smallest cannot fit, the next largest tables join, down to the smallest ones. Then one
per-table ratio c is found by bisection so that every compressed table gets about rows / c of
its memory (a table that cannot shrink that far stays at its smallest), and the total fits the
budget. The reached ratio is at least the asked one, or within TOLERANCE below it when that is
the method's best (fp16: 1.89x at dim 16 for "2x"); anything less is `BudgetUnreachable`, one line
naming emb.budget, the method and the best ratio it can reach.

Example::

    cfg = apply_budget(tables, OmegaConf.create({"name": "hashed", "budget": 100}), optim)
    cfg.buckets     # {C3: 82187, C4: 17868, ...}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dlrm.embeddings.base import EmbeddingBackend, Runtime, TableSpec
from dlrm.embeddings.frequency import counts_source, frequency_order
from dlrm.embeddings.hybrid import hybrid_sizes
from dlrm.embeddings.mde import block_bounds, block_dims, block_freqs, merge_blocks, mde_bytes
from dlrm.embeddings.policy import compressed_tables
from dlrm.embeddings.qr import remainder_size
from dlrm.embeddings.tables import row_bytes
from dlrm.embeddings.tt_kernels import tt_shape

log = logging.getLogger(__name__)

TOLERANCE = 0.1  # a reached ratio may fall this far below the asked one (the method's best)
INF = math.inf
# TT ranks the budget may pick: up to TT-Rec's largest (64, as in conf/experiment/compression), so
# a mild budget compresses fewer tables at rank <= 64 rather than all of them at ranks of 120-137
# (what 2x and 10x picked on the Kaggle tables without the cap). Either way TT's steps are several
# times full's at 10x (docs/benchmarks.md).
MAX_TT_RANK = 64
NOTHING = 1 << 62  # emb.min_rows that compresses no table
GLOBAL_LOWEST = 2.0**-40  # hybrid global's c below 1 grows the hashed rows (_hybrid_global)
# Per-table knobs the budget writes; a config that also sets one of them is an error.
KNOBS = {"hashed": ("buckets",), "qr": ("m",), "hybrid": ("hot_rows", "buckets"), "tt": ("shapes",), "mde": ("dims",)}


class BudgetUnreachable(ValueError):
    """emb.budget asks more than the method can reach; `best` is the best ratio it can."""

    def __init__(self, budget: float, method: str, best: float, why: str = "") -> None:
        self.budget, self.method, self.best = budget, method, best
        super().__init__(
            f"emb.budget={budget:g}: emb={method} reaches at most {best:.3g}x"
            + (f" ({why})" if why else "")
        )


Cost = Callable[[TableSpec, float], tuple[int, object]]  # (table, ratio c) -> (bytes, knob)


@dataclass(frozen=True)
class Plan:
    """What `plan_budget` chose: the emb config with the knobs written in, the compressed tables'
    features, and the bytes (and ratio) `embedding_bytes` will report for it."""

    cfg: DictConfig
    tables: list[str]
    planned_bytes: int
    ratio: float


def apply_budget(
    tables: list[TableSpec],
    cfg: DictConfig,
    optim: DictConfig,
    backend: type[EmbeddingBackend],
    runtime: Runtime | None = None,
) -> DictConfig:
    """`plan_budget(...).cfg`: the emb section with the knobs that fit `emb.budget` written in."""
    return plan_budget(tables, cfg, optim, backend, runtime).cfg


def plan_budget(
    tables: list[TableSpec],
    cfg: DictConfig,
    optim: DictConfig,
    backend: type[EmbeddingBackend],
    runtime: Runtime | None = None,
) -> Plan:
    """The plan for `emb.budget` of `cfg` (the emb section) over `tables`, with `optim` the
    optim.sparse section (its state counts). Raises BudgetUnreachable (a ValueError) if the method
    cannot come within TOLERANCE of the budget, ValueError for a config that sets a knob the
    budget chooses, or for a backend without a budget model (cached)."""
    settings = backend.settings(cfg)
    budget, name = float(settings.budget), settings.name  # >= 1: TABLE_OPTIONS
    precision = settings.get("weights_precision", "fp32")
    keep = {t.name: t.rows * row_bytes(t.dim, optim.name, precision) for t in tables}  # left full
    full = sum(t.full_bytes() for t in tables)
    target = full / budget
    if name in ("full", "fp16"):
        chosen = _fp16_tables(tables, keep, optim, target, budget, name)
        used = sum(t.rows * row_bytes(t.dim, optim.name, "fp16" if t in chosen else "fp32") for t in tables)
        if name == "full":
            used = sum(keep.values())
        names = [t.features[0] for t in chosen]
        return Plan(_with(cfg, tables=names, min_rows=0 if chosen else NOTHING), names, used, full / used)
    for key in KNOBS.get(name, ()):
        if settings.get(key):
            raise ValueError(f"emb.{key} and emb.budget are both set: with a budget, emb={name} chooses {key} itself")
    cost = _cost_model(name, settings, optim, precision, runtime, backend)
    # hybrid's global allocation ranks every table's ids against one count threshold, so small
    # tables take part too (their rare ids share rows; a table whose every id is hot stays full).
    default = list(tables) if _global(name, settings) else compressed_tables(tables, settings)
    rest = sorted((t for t in tables if t not in default), key=lambda t: -t.rows)
    chosen = list(default)

    def total(group: list[TableSpec], c: float) -> int:
        return sum(cost(t, c)[0] if t in group else keep[t.name] for t in tables)

    while total(chosen, INF) > target and rest:
        chosen.append(rest.pop(0))
    best = full / total(chosen, INF)
    if best < budget * (1 - TOLERANCE):
        raise BudgetUnreachable(budget, name, best, "every table compressed to its smallest")
    c = _fit(lambda c: total(chosen, c), target)
    if full / total(chosen, c) > budget * (1 + TOLERANCE):
        # Even the mildest setting of every chosen table overshoots (TT's largest rank, MDE's
        # widest blocks): compress only the largest few instead, as few as fit.
        by_size = sorted(chosen, key=lambda t: -t.rows)
        for k in range(1, len(by_size) + 1):
            if total(by_size[:k], INF) <= target:
                chosen = by_size[:k]
                c = _fit(lambda c: total(chosen, c), target)
                break
    if full / total(chosen, c) > budget * (1 + TOLERANCE) and _global(name, settings):
        # hybrid global: still too small with every seen id hot; below c = 1 the chosen tables
        # get more hashed rows instead (_hybrid_global)
        c = _fit(lambda c: total(chosen, c), target, lo=GLOBAL_LOWEST)
    knobs = {t.features[0]: cost(t, c)[1] for t in chosen}
    knobs = {f: k for f, k in knobs.items() if k is not None}  # None: the table stays full
    if full / total(chosen, c) > budget * (1 + TOLERANCE):
        log.warning("emb.budget=%g: emb=%s overshoots to %.3gx (its settings are too coarse to fill the budget)",
                    budget, name, full / total(chosen, c))
    # (a table whose knob came out None, e.g. every id hot under global allocation, stays full)
    log.info("emb.budget=%g: emb=%s compresses %d tables (%d stay full) at c=%.4g, planned %.4gx",
             budget, name, len(knobs), len(tables) - len(knobs), c, full / total(chosen, c))
    used = total(chosen, c)
    if not knobs:  # the budget fits with every table full
        return Plan(_with(cfg, tables=[], min_rows=NOTHING), [], used, full / used)
    return Plan(_with(cfg, tables=list(knobs), **_knob_keys(name, knobs, settings)), list(knobs), used, full / used)


def _fit(total: Callable[[float], int], target: float, lo: float = 1.0) -> float:
    """The smallest per-table ratio c >= `lo` with total(c) <= target (bisection on log c; total
    falls as c grows); inf if only the smallest settings fit."""
    hi = 1e15
    if total(lo) <= target:
        return lo
    if total(hi) > target:
        return INF
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if total(mid) <= target else (mid, hi)
        if hi / lo < 1 + 1e-9:
            break
    return hi


def _fp16_tables(tables, keep, optim, target, budget, name) -> list[TableSpec]:
    """fp16 (or full): store the largest tables in fp16 until the total fits `target`."""
    full = sum(t.full_bytes() for t in tables)
    if name == "full":
        if full / sum(keep.values()) < budget * (1 - TOLERANCE):
            raise BudgetUnreachable(budget, name, full / sum(keep.values()), "full compresses nothing; emb=fp16 halves rows")
        return list(tables)
    half = {t.name: t.rows * row_bytes(t.dim, optim.name, "fp16") for t in tables}
    fp32 = {t.name: t.rows * row_bytes(t.dim, optim.name, "fp32") for t in tables}
    chosen: list[TableSpec] = []
    for t in sorted(tables, key=lambda t: -t.rows):
        if sum(half[c.name] for c in chosen) + sum(fp32[u.name] for u in tables if u not in chosen) <= target:
            break
        chosen.append(t)
    best = full / sum(half.values())
    if best < budget * (1 - TOLERANCE):
        raise BudgetUnreachable(budget, name, best, "every table in fp16")
    return chosen


def _with(cfg: DictConfig, **values) -> DictConfig:
    """A copy of `cfg` with `values` set and the budget spent (so it is not applied twice)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.budget = None
    for k, v in values.items():
        out[k] = v
    return out


def _knob_keys(name: str, knobs: dict, settings: DictConfig) -> dict:
    if name == "hybrid":
        return {"hot_rows": {f: h for f, (h, _) in knobs.items()}, "buckets": {f: b for f, (_, b) in knobs.items()}}
    if name == "tt":
        return {"shapes": {f: {"ranks": [r] * (int(settings.cores) - 1)} for f, r in knobs.items()}}
    return {KNOBS[name][0]: knobs}


def _cost_model(name, settings, optim, precision, runtime, backend) -> Cost:
    """(table, c) -> (bytes, knob): the knob that gives `table` about full_bytes / c bytes (its
    smallest at c = inf), and the bytes `embedding_bytes` will count for it."""

    def row(d: int) -> int:
        return row_bytes(d, optim.name, precision)

    if name == "hashed":
        def hashed(t, c):
            n = max(1, math.ceil(t.rows / c)) if c < INF else 1
            return n * row(t.dim), n
        return hashed
    if name == "qr":
        def qr(t, c):
            w = t.dim // 2 if settings.combiner == "concat" else t.dim
            m = remainder_size(t.rows, c if c < INF else 1e300, t.dim / w)
            return (m + math.ceil(t.rows / m)) * row(w), m
        return qr
    if name == "hybrid" and _global(name, settings):
        return _hybrid_global(settings, row, runtime)
    if name == "hybrid":
        share = float(settings.hot_share)

        def hybrid(t, c):
            physical = max(1, math.ceil(t.rows / c)) if c < INF else 1
            h, b = hybrid_sizes(t.rows, physical, share)
            return physical * row(t.dim) + 8 * h, (h, b)
        return hybrid
    if name == "tt":
        cores = int(settings.cores)
        adagrad = settings.optimizer == "adagrad"

        def tt_bytes(t, r):
            n = tt_shape(t.rows, t.dim, cores=cores, rank=r, name=t.name).num_params
            return n * 8 + 4 * cores if adagrad else n * 4
        return _discrete({}, lambda t: [(tt_bytes(t, r), r) for r in range(1, MAX_TT_RANK + 1)])
    if name == "mde":
        source = counts_source(settings.counts, runtime, name)
        blocks, alpha, min_dim = int(settings.blocks), float(settings.alpha), int(settings.min_dim)

        def mde_options(t):
            bounds = block_bounds(t.rows, blocks)
            freqs = block_freqs(frequency_order(t, source)[1], bounds)
            out = {}
            for i in range(600):  # scales 10^4 .. 10^-8: every width pattern the rule gives
                dims = block_dims(freqs, t.dim, alpha, 10 ** (4 - i / 50), min_dim)
                merged = merge_blocks(bounds, dims)
                out.setdefault(tuple(dims), mde_bytes(t.rows, t.dim, *merged, row, settings.optimizer))
            return [(b, list(d)) for d, b in out.items()]
        return _discrete({}, mde_options)
    raise ValueError(f"emb.budget: emb={name} has no budget model (budgets apply to full, fp16, hashed, qr, hybrid, tt, mde)")


def _discrete(cache: dict, options: Callable[[TableSpec], list[tuple[int, object]]]) -> Cost:
    """A cost from a finite list of (bytes, knob) per table: the largest option within
    full_bytes / c, or the smallest option if none is."""

    def cost(t: TableSpec, c: float):
        if t.name not in cache:
            cache[t.name] = sorted(options(t), key=lambda o: o[0])
        opts = cache[t.name]
        limit = t.full_bytes() / c
        fitting = [o for o in opts if o[0] <= limit]
        return fitting[-1] if fitting else opts[0]
    return cost


def _global(name: str, settings: DictConfig) -> bool:
    return name == "hybrid" and settings.get("allocation", "table") == "global"


def _hybrid_global(settings: DictConfig, row: Callable[[int], int], runtime: Runtime | None) -> Cost:
    """hybrid with `emb.allocation=global`: c is a count threshold shared by every table: the ids
    seen at least c times in the train split get exact rows (H per table), and each table adds
    B = ceil(H (1 - hot_share) / hot_share) >= 1 hashed rows for the rest. The budget thus goes to
    the most frequent ids of all tables, as CAFE's global hot threshold does (Zhang et al., SIGMOD
    2024), instead of the same share of every table's rows (`allocation=table`). A table whose
    every id would be hot, or that would not shrink, keeps its full rows (knob None).

    Below c = 1 the threshold cannot fall further (every id seen in the train split is hot
    already; the rest were never seen), so there c grows the hashed rows instead: B rises from its
    c = 1 size to every cold id's own row as c falls to 0. `plan_budget` goes there only when
    compressing fewer tables still overshoots: a mild budget on tables whose ids are mostly unseen
    (40M-row tables, 2M training rows) then spends its memory on fewer collisions rather than
    overshooting (12.4x for "10x" before)."""
    share = float(settings.hot_share)
    if not 0 < share <= 1:
        raise ValueError(f"emb.hot_share={share!r}: emb.allocation=global needs a share in (0, 1]")
    source = counts_source(settings.counts, runtime, "hybrid")
    if source is None:  # the Zipf prior's counts (<= 1) have no scale for a count threshold
        raise ValueError("emb.allocation=global needs per-id counts: set emb.counts, or train on a dataset")
    cache: dict[str, np.ndarray] = {}

    def cost(t: TableSpec, c: float):
        if t.name not in cache:
            cache[t.name] = np.sort(frequency_order(t, source)[1])  # ascending counts
        counts = cache[t.name]
        hot = 0 if c == INF else _at_least(counts, max(c, 1.0))
        buckets = max(1, math.ceil(hot * (1 - share) / share))
        if c < 1:  # more hashed rows, up to one per cold id at c = 0
            buckets += round((1 - c) * max(0, t.rows - hot - buckets))
        used, full = (hot + buckets) * row(t.dim) + 8 * hot, t.rows * row(t.dim)
        return (full, None) if hot >= t.rows or used >= full else (used, (hot, buckets))
    return cost


def _at_least(counts: np.ndarray, c: float) -> int:
    """How many of the ascending `counts` are >= c, interpolated between integers: for c in
    (k, k + 1), the ids counted k times join in order as c falls (frequency_order breaks ties by id),
    so the budget's bisection sees bytes fall smoothly rather than by every id seen k times at once
    (at small k, most of a big table)."""
    k = math.floor(c)
    at_least = lambda x: len(counts) - int(np.searchsorted(counts, x, side="left"))
    above, tied = at_least(k + 1), at_least(k) - at_least(k + 1)
    return above + round((k + 1 - c) * tied) if c > k else at_least(k)

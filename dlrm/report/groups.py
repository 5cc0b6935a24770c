"""Grouping runs that differ only by seed, their knobs, and the comparable `full` baseline."""

from __future__ import annotations

import math

import pandas as pd

from dlrm.report.runs import Run, _overrides_as_config

BACKEND_ORDER = ["full", "fp16", "hashed", "qr", "hybrid", "tt", "mde", "cached"]
BASELINE = "full"
# Keys that must match for a group to be compared with a full group: same dataset, same towers,
# same number and size of steps, same eval split. Everything else (lr, threads, ...) may differ.
SAME_FOR_BASELINE = ("data.", "model.", "trainer.max_steps", "trainer.batch_size", "trainer.eval_batches")
# ... except how the data is read, which does not change what it is.
LOADING_ONLY = ("data.workers", "data.root")
# Keys that describe the backend, not the setting it is compared in.
BACKEND_KEYS = ("emb.", "rank", "compression")
NOISE_SIGMAS = 2.0
NOISE_RULE = (
    f"within noise: |dAUC| <= {NOISE_SIGMAS:g} * SE, SE = sqrt(s1^2/n1 + s2^2/n2) "
    "(sample std s over n seeds of the group and of its full baseline; needs n >= 2 on both sides)"
)


# ----------------------------------------------------------------------------- grouping


def group_runs(runs: list[Run]) -> pd.DataFrame:
    """One row per group of finished runs that differ only by `seed`; knobs and baseline added."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.results is None:
            continue
        if run.config:
            key = tuple(sorted((k, v) for k, v in run.config.items() if k != "seed"))
            key = (("__backend__", run.backend),) + key
        else:  # results.json without .hydra/: nothing to group by
            key = (("__dir__", str(run.path)),)
        groups.setdefault(key, []).append(run)

    rows = []
    for members in groups.values():
        res = pd.DataFrame([m.results for m in members])
        numeric = res.select_dtypes("number")
        row = {"backend": members[0].backend, "n_seeds": len(members)}
        seeds = [str(m.config.get("seed", "?")) for m in members]
        row["seeds"] = " ".join(seeds)
        row["_repeated_seeds"] = len(set(seeds)) < len(seeds)  # e.g. one seed in two DIRs
        row["auc_mean"] = res["auc"].mean(skipna=False)  # one undefined AUC: the mean is too
        row["auc_std"] = res["auc"].std(ddof=1) if len(members) > 1 else math.nan
        for col in numeric.columns:
            if col == "peak_rss_bytes":
                row[col] = numeric[col].max()  # worst case over seeds
            elif col != "auc":
                row[col] = numeric[col].mean()
        if "compression_ratio" not in row and {"full_embedding_bytes", "embedding_bytes"} <= row.keys():
            row["compression_ratio"] = row["full_embedding_bytes"] / row["embedding_bytes"]
        if "logloss" in numeric:
            row["logloss_std"] = numeric["logloss"].std(ddof=1) if len(members) > 1 else math.nan
        row["runs"] = " ".join(str(m.path) for m in members)
        row["_config"] = {k: v for k, v in members[0].config.items() if k != "seed"}
        row["_overridden"] = {k for m in members for k in _overrides_as_config(m.overrides)}
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["backend", "knobs", "n_seeds", "auc_mean", "auc_std"])
    df = pd.DataFrame(rows)
    df["knobs"] = _knobs(df, runs)
    _add_baseline(df)
    order = {b: i for i, b in enumerate(BACKEND_ORDER)}
    df["_order"] = df["backend"].map(lambda b: order.get(b, len(order)))
    sort = ["_order", "backend"] + (["compression_ratio"] if "compression_ratio" in df else []) + ["knobs"]
    return df.sort_values(sort, kind="stable").drop(columns="_order").reset_index(drop=True)


_MISSING = object()


def _knobs(df: pd.DataFrame, runs: list[Run]) -> list[str]:
    """Per group, the config keys that tell it apart: keys whose value differs between groups of
    the same backend, plus the group's own command-line overrides whose value differs across the
    runs (`rank=8` of the only tt group). Overrides every run shares (`trainer.threads=1`) and
    `seed` are left out."""
    per_run = [_overrides_as_config(r.overrides) for r in runs if r.results]
    override_keys = {k for o in per_run for k in o}
    varying_overrides = {k for k in override_keys if len({repr(o.get(k, _MISSING)) for o in per_run}) > 1}
    varying: dict[str, set[str]] = {}
    for backend, sub in df.groupby("backend"):
        keys = set().union(*(c.keys() for c in sub["_config"]))
        varying[backend] = {k for k in keys if len({repr(c.get(k, _MISSING)) for c in sub["_config"]}) > 1}
    return [
        " ".join(f"{k}={_fmt_value(c[k])}" for k in sorted(varying[b] | (varying_overrides & own)) if k in c)
        for b, c, own in zip(df["backend"], df["_config"], df["_overridden"])
    ]


def _fmt_value(v) -> str:
    return "[" + ",".join(_fmt_value(x) for x in v) + "]" if isinstance(v, tuple) else str(v)


def _value(cfg: dict, key: str):
    """A config value, with unset (missing, null, empty) as one value: a key added to the config
    later (null by default) must not make old runs incomparable with new ones."""
    v = cfg.get(key)
    return None if v is None or v == {} or v == [] else v


def _matches(a: dict, b: dict, prefixes) -> bool:
    keys = {k for k in a.keys() | b.keys() if k.startswith(prefixes) and k not in LOADING_ONLY}
    return all(_value(a, k) == _value(b, k) for k in keys)


def _add_baseline(df: pd.DataFrame) -> None:
    """auc_diff_vs_full: group mean minus the comparable full group's mean, with the noise verdict."""
    fulls = df.index[df["backend"] == BASELINE]
    cols = {"auc_diff_vs_full": [], "auc_diff_se": [], "within_noise": [], "baseline_run": []}
    for _, row in df.iterrows():
        cands = [j for j in fulls if _matches(row["_config"], df.at[j, "_config"], SAME_FOR_BASELINE)]
        if row["backend"] == BASELINE or not cands:
            for col, v in zip(cols, (math.nan, math.nan, None, "")):
                cols[col].append(v)
            continue
        j = min(cands, key=lambda j: _distance(row["_config"], df.at[j, "_config"]))
        d = row["auc_mean"] - df.at[j, "auc_mean"]
        n1, n2 = row["n_seeds"], df.at[j, "n_seeds"]
        se = math.sqrt(row["auc_std"] ** 2 / n1 + df.at[j, "auc_std"] ** 2 / n2) if min(n1, n2) >= 2 else math.nan
        within = None if math.isnan(se) or math.isnan(d) else bool(abs(d) <= NOISE_SIGMAS * se)
        for col, v in zip(cols, (d, se, within, df.at[j, "runs"].split()[0])):
            cols[col].append(v)
    for col, values in cols.items():
        df[col] = values


def _distance(a: dict, b: dict) -> int:
    """Differences outside the backend's own keys (lr, threads, ...): the fewest = fairest baseline."""
    keys = {k for k in a.keys() | b.keys() if not k.startswith(BACKEND_KEYS)}
    return sum(_value(a, k) != _value(b, k) for k in keys)



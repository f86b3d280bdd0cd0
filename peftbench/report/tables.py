"""Runs → one row per arm: the nuisance setting picked on validation, mean ± std and a 95% CI over seeds, efficiency.

Pure functions on the DataFrame of :func:`peftbench.report.load_runs` (one row per run, the columns of
:func:`peftbench.store.flatten` plus ``nuisance``, the run's ``train`` settings as canonical JSON).

Example::

    >>> import pandas as pd
    >>> from peftbench.report.tables import seed_ci
    >>> low, high, how = seed_ci([0.80, 0.82, 0.81, 0.83, 0.815])
    >>> how, low <= 0.815 <= high
    ('bootstrap', True)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from peftbench import config, methods

# Runs are grouped by study as well: runs of two studies that share a model, dataset and arm label (say one with
# max_train = 200) are two arms, never pooled.
GROUP_KEY = ["study", "model", "dataset"]
ARM_KEY = GROUP_KEY + ["arm"]
METRICS = list(config.METRICS)
PARAMS = ["params_trainable", "params_adapter", "params_head", "params_total", "params_base_model",
          "params_trainable_pct"]
COSTS = ["train_time_s", "train_examples_per_s", "eval_time_s", "peak_memory_mb", "adapter_size_bytes",
         "invalid",  # invalid: llm predictions whose reply named no label (counted wrong), mean over seeds
         "estimated_cost_usd",  # llm arms: the price of the requests as a fresh run would pay it
         "train_flops", "train_flops_per_s", "eval_flops", "eval_flops_per_s"]  # model FLOPs and achieved FLOP/s (peftbench.flops)
# Arms with at least this many seeds get a percentile bootstrap CI over seeds, fewer a Student t interval (seed_ci).
MIN_SEEDS_FOR_BOOTSTRAP = 5


def higher_is_better(metric: str) -> bool:
    return metric != "loss"


def ensure_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """Add every column the report reads, empty where a run (e.g. a failed one, or a tf-idf baseline) lacks it."""
    wanted = ["run_id", "status", "error", "study", "arm", "model", "dataset", "method", "seed", "r", "lr",
              "lr_scheduler", "nuisance", "path"]
    wanted += [f"{split}_{m}" for split in ("test", "val") for m in METRICS + ["loss"]]
    wanted += PARAMS + COSTS
    runs = runs.copy()
    for col in wanted:
        if col not in runs.columns:
            runs[col] = np.nan if col not in ("arm", "model", "dataset", "method", "nuisance") else None
    # A run without an arm label (hand-made store) is labelled by its method.
    runs["arm"] = runs["arm"].where(runs["arm"].notna(), runs["method"]).astype(object)
    for col in ("model", "dataset", "nuisance", "method"):
        runs[col] = runs[col].where(runs[col].notna(), "?").astype(object)
    return runs


def with_study(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``study`` column (empty when it has none: a hand-made frame of one study)."""
    return frame if "study" in frame.columns else frame.assign(study=np.nan)


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not succeed: run id, arm, seed and the one-line error."""
    bad = runs[runs["status"] != "success"]
    cols = ["run_id", "study", "model", "dataset", "arm", "lr", "seed", "status", "error"]
    return bad[cols].reset_index(drop=True)


def nuisance_label(train: dict[str, Any], keys: list[str]) -> str:
    """``lr=0.001, lr_scheduler=linear`` for the train settings in ``keys``."""
    return ", ".join(f"{k}={train.get(k)}" for k in keys) or "-"


def varying_keys(nuisances: list[str]) -> list[str]:
    """The train settings whose values differ among an arm's nuisance options (always at least lr)."""
    dicts = [json.loads(n) if n and n != "?" else {} for n in nuisances]
    keys = sorted({k for d in dicts for k in d})
    varying = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1]
    return varying or [k for k in ("lr",) if k in keys]


def nuisance_scores(runs: pd.DataFrame, selection_metric: str = "accuracy") -> pd.DataFrame:
    """One row per (arm, nuisance setting) of the successful runs: mean validation score over seeds, number of seeds,
    and ``chosen`` — the best validation score of its arm (ties: more seeds, then the first setting). Test scores
    play no part in the choice."""
    ok = with_study(runs[runs["status"] == "success"])
    col = f"val_{selection_metric}"
    rows = []
    for key, arm_runs in ok.groupby(ARM_KEY, sort=False, dropna=False):
        options = list(dict.fromkeys(arm_runs["nuisance"]))
        keys = varying_keys(options)
        for nuisance in options:
            group = arm_runs[arm_runs["nuisance"] == nuisance]
            train = json.loads(nuisance) if nuisance != "?" else {}
            rows.append({**dict(zip(ARM_KEY, key)), "method": group["method"].iloc[0], "r": group["r"].iloc[0],
                         "nuisance": nuisance, "setting": nuisance_label(train, keys),
                         "seeds": int(group["seed"].nunique()),
                         "val_score": float(pd.to_numeric(group[col], errors="coerce").mean())})
    scores = pd.DataFrame(rows, columns=ARM_KEY + ["method", "r", "nuisance", "setting", "seeds", "val_score"])
    sign = 1.0 if higher_is_better(selection_metric) else -1.0
    scores["_rank"] = (sign * scores["val_score"]).fillna(-np.inf)
    order = scores.sort_values(["_rank", "seeds"], ascending=False, kind="stable")
    best = order.drop_duplicates(ARM_KEY, keep="first").index
    scores["chosen"] = scores.index.isin(best)
    return ordered(scores.sort_values("_rank", ascending=False, kind="stable").drop(columns="_rank"))


def select_nuisance(runs: pd.DataFrame, selection_metric: str = "accuracy") -> pd.DataFrame:
    """The successful runs of each arm's chosen nuisance setting (see :func:`nuisance_scores`)."""
    scores = nuisance_scores(runs, selection_metric)
    chosen = scores.loc[scores["chosen"], ARM_KEY + ["nuisance", "setting"]]
    ok = with_study(runs[runs["status"] == "success"])
    return ok.merge(chosen, on=ARM_KEY + ["nuisance"], how="inner")


def seed_ci(values, confidence: float = 0.95, n_resamples: int = 2000) -> tuple[float, float, str]:
    """A confidence interval of the mean over seeds: ``(low, high, method)``.

    5 or more seeds: percentile bootstrap over seeds (``scipy.stats.bootstrap``). 2–4 seeds: Student t interval
    (``scipy.stats.t``), because a bootstrap of so few values is little more than their min–max range and covers the
    mean far less often than claimed (about 75% of the time for 3 normal values, not 95%). 1 seed: no interval (NaN,
    "n/a")."""
    x = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    if len(x) < 2:
        return float("nan"), float("nan"), "n/a"
    mean = float(x.mean())
    if np.allclose(x, x[0]):
        return mean, mean, "bootstrap" if len(x) >= MIN_SEEDS_FOR_BOOTSTRAP else "t"
    if len(x) < MIN_SEEDS_FOR_BOOTSTRAP:
        low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=stats.sem(x))
        return float(low), float(high), "t"
    res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", random_state=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), "bootstrap"


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by study, model, dataset, then method (``methods.order``: baselines first, full fine-tuning last), rank
    and arm label; the order within an arm is kept (stable)."""
    if not len(frame):
        return frame.reset_index(drop=True)

    def key(i):
        row = frame.loc[i]
        r = row.get("r")
        return (str(row.get("study")), str(row["model"]), str(row["dataset"]), methods.order(row["method"]),
                float(r) if pd.notna(r) else 0.0, str(row["arm"]))

    return frame.loc[sorted(frame.index, key=key)].reset_index(drop=True)


def arm_table(selected: pd.DataFrame) -> pd.DataFrame:
    """One row per arm (study × model × dataset × arm label) over the seeds of its chosen nuisance setting.

    Metrics are fractions (test split): ``accuracy`` (the mean), ``accuracy_std`` (sample std over seeds, NaN for one
    seed), ``accuracy_ci_low``/``accuracy_ci_high`` (95% CI of the mean, :func:`seed_ci`), and so on for every metric.
    Parameter counts, training time, throughput, peak memory and adapter size are means over seeds (NaN = not
    applicable, e.g. no adapter)."""
    rows = []
    for key, g in with_study(selected).groupby(ARM_KEY, sort=False, dropna=False):
        first = g.iloc[0]
        row: dict[str, Any] = {**dict(zip(ARM_KEY, key)), "method": first["method"], "r": first["r"],
                               "lr": first["lr"], "lr_scheduler": first["lr_scheduler"], "setting": first["setting"],
                               "seeds": int(g["seed"].nunique()),
                               "seed_list": " ".join(str(int(s)) for s in sorted(g["seed"].dropna())),
                               "run_ids": " ".join(g["run_id"])}
        for col in PARAMS:
            row[col] = pd.to_numeric(g[col], errors="coerce").mean()
        for m in METRICS:
            values = pd.to_numeric(g[f"test_{m}"], errors="coerce").dropna()
            low, high, how = seed_ci(values)
            row[m] = values.mean() if len(values) else np.nan
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = low, high
            if m == "accuracy":
                row["ci_method"] = f"seeds only ({how})" if how != "n/a" else how
        row["val_accuracy"] = pd.to_numeric(g["val_accuracy"], errors="coerce").mean()
        row["val_f1_macro"] = pd.to_numeric(g["val_f1_macro"], errors="coerce").mean()
        for col in COSTS:
            values = pd.to_numeric(g[col], errors="coerce")
            row[col] = values.mean()
            if col == "train_time_s":
                row["train_time_s_std"] = values.std(ddof=1) if values.notna().sum() > 1 else np.nan
        rows.append(row)
    return ordered(pd.DataFrame(rows))


def expected_max(values, higher: bool = True) -> list[float]:
    """Expected best validation score of ``n`` = 1 … N trials drawn without replacement from the N observed ones:
    the unbiased U-statistic Σ_{i≥n} v_(i)·C(i−1, n−1)/C(N, n) (Dodge et al. 2019, "Show your work"; Dodge et al. 2021
    for the unbiased form). ``higher=False`` (a loss): the expected minimum."""
    from math import comb

    v = sorted((1.0 if higher else -1.0) * float(x) for x in values if pd.notna(x))
    n_all = len(v)
    out = [sum(v[i - 1] * comb(i - 1, n - 1) for i in range(n, n_all + 1)) / comb(n_all, n)
           for n in range(1, n_all + 1)]
    return out if higher else [-x for x in out]


def tuning_curves(scores: pd.DataFrame, selection_metric: str = "accuracy") -> pd.DataFrame:
    """Per arm, the expected best mean validation score against the number of nuisance settings tried
    (:func:`expected_max` over the arm's settings in :func:`nuisance_scores`), and ``unequal_grid``: True for every
    arm of a study × model × dataset group whose arms were tuned over different numbers of settings (an unfair
    comparison: more trials alone raise the expected best)."""
    rows = []
    for key, g in with_study(scores).groupby(ARM_KEY, sort=False, dropna=False):
        curve = expected_max(g["val_score"], higher_is_better(selection_metric))
        rows += [{**dict(zip(ARM_KEY, key)), "trials": n + 1, "of": len(curve), "expected_best": v}
                 for n, v in enumerate(curve)]
    out = pd.DataFrame(rows, columns=ARM_KEY + ["trials", "of", "expected_best", "unequal_grid"])
    if len(out):
        sizes = out.groupby(GROUP_KEY, dropna=False)["of"].transform("nunique")
        out["unequal_grid"] = sizes > 1
    return out


def _lr_of(nuisance: str) -> float | None:
    """The learning rate of a nuisance setting (canonical JSON of the run's train settings), None if it has none."""
    lr = (json.loads(nuisance) if nuisance and nuisance != "?" else {}).get("lr")
    return float(lr) if lr is not None else None


def lr_readout(scores: pd.DataFrame, reference: str = "full",
               selection_metric: str = "accuracy") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each arm's best learning rate against the reference's, for the (study, model, dataset) groups whose reference arm
    sweeps the learning rate; only arms that sweep it too (more than one lr among their settings) are read.

    Returns ``(summary, grid)`` from :func:`nuisance_scores`. ``summary``: one row per such arm, the reference
    included — ``lrs`` (how many it tried), ``best_lr`` (the lr of its chosen setting, picked on validation),
    ``val_score`` there, ``reference_best_lr``, ``lr_ratio`` = best_lr / reference_best_lr, and ``edge``
    ("lowest"/"highest" when the best lr is the end of the arm's grid: the true optimum may lie beyond, so the ratio
    is then only a bound; else ""). ``grid``: one row per (arm, lr) — ``val_score``, the best mean validation score of
    the arm's settings with that lr (other swept settings, e.g. the scheduler, at their best), their ``seeds``, and
    ``best`` (the lr of the chosen setting). Both empty when nothing applies."""
    summary_cols = ARM_KEY + ["method", "r", "reference", "lrs", "best_lr", "val_score", "reference_best_lr",
                              "lr_ratio", "edge"]
    grid_cols = ARM_KEY + ["method", "lr", "val_score", "seeds", "best"]
    if not len(scores):
        return pd.DataFrame(columns=summary_cols), pd.DataFrame(columns=grid_cols)
    higher = higher_is_better(selection_metric)
    scores = with_study(scores).assign(lr=[_lr_of(n) for n in scores["nuisance"]])
    summary, grid = [], []
    for _, group in scores.groupby(GROUP_KEY, sort=False, dropna=False):
        ref = find_reference(group, reference)
        if ref is None or group.loc[group["arm"] == ref["arm"], "lr"].nunique() < 2:
            continue
        arms = {}
        for arm, part in group.groupby("arm", sort=False):
            if part["lr"].nunique() < 2:
                continue
            best_lr = float(part.loc[part["chosen"], "lr"].iloc[0])
            per_lr = part.dropna(subset=["lr"]).sort_values("val_score", ascending=not higher, kind="stable")
            per_lr = per_lr.drop_duplicates("lr").sort_values("lr")
            grid += [{**{k: row[k] for k in ARM_KEY + ["method", "lr", "val_score", "seeds"]},
                      "best": row["lr"] == best_lr} for _, row in per_lr.iterrows()]
            lrs = per_lr["lr"].tolist()
            arms[arm] = {**{k: part[k].iloc[0] for k in ARM_KEY + ["method", "r"]}, "lrs": len(lrs), "best_lr": best_lr,
                         "val_score": float(part.loc[part["chosen"], "val_score"].iloc[0]),
                         "edge": "lowest" if best_lr == lrs[0] else "highest" if best_lr == lrs[-1] else ""}
        ref_lr = arms[ref["arm"]]["best_lr"]
        summary += [{**a, "reference": ref["arm"], "reference_best_lr": ref_lr, "lr_ratio": a["best_lr"] / ref_lr}
                    for a in arms.values()]
    return (ordered(pd.DataFrame(summary, columns=summary_cols)),
            pd.DataFrame(grid, columns=grid_cols))


def find_reference(group: pd.DataFrame, reference: str) -> pd.Series | None:
    """The reference arm of one (study, model, dataset) group: the arm labelled ``reference``, else the first arm whose
    method is ``reference``; None if there is none."""
    hit = group[group["arm"] == reference]
    if not len(hit):
        hit = group[group["method"] == reference]
    return hit.iloc[0] if len(hit) else None


def _saving(value: float, ref: float) -> float:
    """100 · (1 − value / ref): how much smaller value is than ref, in percent (NaN if either is unknown)."""
    if pd.isna(value) or pd.isna(ref) or ref == 0:
        return float("nan")
    return 100.0 * (1.0 - float(value) / float(ref))


def efficiency(table: pd.DataFrame, reference: str = "full", metric: str = "accuracy") -> pd.DataFrame:
    """Each arm against the reference arm of its (study, model, dataset) group: metric difference in points (arm −
    reference), training-time saving %, trainable-parameter reduction % and peak-memory saving % (positive = the arm
    uses less), and an llm arm's ``estimated_cost_usd`` (mean over seeds; NaN for the others)."""
    rows = []
    for (study, model, dataset), group in with_study(table).groupby(GROUP_KEY, sort=False, dropna=False):
        ref = find_reference(group, reference)
        if ref is None:
            continue
        for _, row in group[group["arm"] != ref["arm"]].iterrows():
            rows.append({"study": study, "model": model, "dataset": dataset, "arm": row["arm"], "reference": ref["arm"],
                         f"{metric}_diff_points": 100.0 * (row[metric] - ref[metric]),
                         "time_saving_pct": _saving(row["train_time_s"], ref["train_time_s"]),
                         "param_reduction_pct": _saving(row["params_trainable"], ref["params_trainable"]),
                         "memory_saving_pct": _saving(row["peak_memory_mb"], ref["peak_memory_mb"]),
                         "estimated_cost_usd": row.get("estimated_cost_usd")})
    cols = ["study", "model", "dataset", "arm", "reference", f"{metric}_diff_points", "time_saving_pct",
            "param_reduction_pct", "memory_saving_pct", "estimated_cost_usd"]
    return pd.DataFrame(rows, columns=cols)


def runs_summary(runs: pd.DataFrame, selected_ids: set[str] | None = None) -> pd.DataFrame:
    """Every run as one row, in the columns of the Banking77 repo's ``results_summary.csv`` (run, mode, rank, lr,
    scheduler, trainable params, total params, share %, train time, val macro-F1, test macro-F1), then seed, status,
    study, model, dataset, test accuracy, whether the report's tables use the run, and its error."""
    selected_ids = selected_ids or set()
    out = pd.DataFrame({
        "run": runs["run_id"], "mode": runs["arm"], "rank": runs["r"], "lr": runs["lr"],
        "scheduler": runs["lr_scheduler"], "trainable_params": runs["params_trainable"],
        "total_params": runs["params_total"], "share_pct": runs["params_trainable_pct"],
        "train_time_s": runs["train_time_s"], "val_macro_f1": runs["val_f1_macro"],
        "test_macro_f1": runs["test_f1_macro"], "seed": runs["seed"], "status": runs["status"],
        "study": runs["study"], "model": runs["model"], "dataset": runs["dataset"], "method": runs["method"],
        "test_accuracy": runs["test_accuracy"], "in_tables": runs["run_id"].isin(selected_ids),
        "error": runs["error"]})
    return out.sort_values(["study", "model", "dataset", "mode", "lr", "seed"], kind="stable").reset_index(drop=True)


def best_arm(table: pd.DataFrame, metric: str = "accuracy") -> pd.Series | None:
    """The arm with the best mean test ``metric`` (ties: fewer trainable parameters); None for an empty table."""
    if not len(table) or table[metric].isna().all():
        return None
    sign = 1.0 if higher_is_better(metric) else -1.0
    ranked = table.assign(_score=sign * table[metric], _params=table["params_trainable"].fillna(np.inf))
    ranked = ranked.sort_values(["_score", "_params"], ascending=[False, True], kind="stable")
    return table.loc[ranked.index[0]]

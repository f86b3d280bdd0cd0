"""The hypothesis verdict: is a candidate arm non-inferior (or superior, or inferior) to the reference arm?

Pure functions on stored test predictions (``predictions.parquet`` frames: ``id``, ``label``, ``pred``, …), one per
training seed. docs/report.md has the long version with references; in short:

1. **Two sources of variance.** A run's test score varies with its *training seed* (the replication unit: Bouthillier
   et al. 2021) and with *which examples happen to be in the test set* (shared by every run). Each arm's runs form an
   examples × seeds table of per-example scores (correct or not for accuracy; the metric's linearised, delta-method
   contribution for F1/precision/recall), analysed as a crossed two-way random-effects model (Searle, Casella &
   McCulloch 1992): example effect, seed effect, interaction.
2. **The difference** Δ = mean over the candidate's seeds − mean over the reference's seeds (points), on the test
   examples every run of both arms has. Its variance, estimated without double counting::

       V = var_i(x_i)/n + Σ_arm max(0, s²_arm − MSE_arm/n) / k_arm

   with x_i the per-example difference of the seed means, s²_arm the variance of the arm's per-seed scores and
   MSE_arm its example × seed interaction mean square. The interval is Δ ± t_{df}·√V, df by Satterthwaite (1946):
   with 3 seeds the quantile is close to t₂ = 4.30 when seed variance dominates, close to 1.96 when the test set does.
3. **Decision** at one-sided level α (default 0.025, i.e. the two-sided 95% interval, as in CONSORT's
   non-inferiority extension, Piaggio et al. 2012): *superior* if the lower bound > 0, *non-inferior* if it is
   > −margin, *inferior* if the upper bound < −margin, else *undecided*. Across the arms compared with the
   reference, the decisive one-sided p-value is Holm-adjusted (Holm 1979) with directional claims (Shaffer 1980).
4. **Planning**: from the estimated variance components, the seeds (at this test-set size) and the test examples (at
   these seeds) that would decide with 80% power, and whether more seeds can help at all.
5. **Sequential looks** (``peftbench run --until-decided``): the level of each look comes from a Lan–DeMets
   alpha-spending function (Pocock type) over the planned looks, and the looks' levels add up to α, so the overall
   error rate stays ≤ α whatever the looks' correlation (union bound).

The error rates are checked by simulation in tests/test_verdict_stats.py.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.random((2000, 5)) < 0.85            # 2,000 test examples × 5 seeds, correct or not
    >>> cand = rng.random((2000, 5)) < 0.85
    >>> out = difference(cand.astype(float), ref.astype(float))
    >>> round(out["se"] * 100, 2) < 1.0
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

SUPERIOR = "superior"
NON_INFERIOR = "non-inferior"
INFERIOR = "inferior"
UNDECIDED = "undecided"
NOT_TESTED = "not tested — no stored predictions"
DECIDED = (SUPERIOR, NON_INFERIOR, INFERIOR)
ALPHA = 0.025  # one-sided: the two-sided 95% interval's lower (upper) bound against −margin
POWER = 0.8
MAX_SEEDS_PLANNED = 1000
MAX_EXAMPLES_PLANNED = 10_000_000


# --------------------------------------------------------------------------------------------------------------------
# Metrics of hard predictions as per-example scores
# --------------------------------------------------------------------------------------------------------------------


def influence(labels: np.ndarray, preds: np.ndarray, metric: str, num_labels: int) -> np.ndarray:
    """Per-example contributions ψ (n,) whose mean is the metric of ``preds``: exact for accuracy (1 if right), the
    first-order (delta-method / infinitesimal-jackknife, Efron & Tibshirani 1993) linearisation for the ratio metrics
    precision, recall and F1 (macro or weighted), so that var(ψ)/n is their test-sampling variance."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if metric == "accuracy":
        return (labels == preds).astype(float)
    classes = np.arange(num_labels)
    g = (labels[:, None] == classes).astype(float)   # gold indicator, (n, C)
    p = (preds[:, None] == classes).astype(float)    # predicted indicator
    t = g * p                                        # true positive indicator
    tb, pb, gb = t.mean(0), p.mean(0), g.mean(0)
    kind, avg = metric.rsplit("_", 1)
    den = {"precision": pb, "recall": gb, "f1": (pb + gb) / 2}[kind]
    safe = np.where(den > 0, den, 1.0)
    m = np.where(den > 0, tb / safe, 0.0)             # per-class metric
    d_t = np.where(den > 0, 1.0 / safe, 0.0)          # ∂m/∂t̄
    d_den = np.where(den > 0, -tb / safe ** 2, 0.0)   # ∂m/∂den
    d_p = d_den * {"precision": 1.0, "recall": 0.0, "f1": 0.5}[kind]
    d_g = d_den * {"precision": 0.0, "recall": 1.0, "f1": 0.5}[kind]
    lin = m + (t - tb) * d_t + (p - pb) * d_p + (g - gb) * d_g   # (n, C): each class's linearised metric
    if avg == "macro":
        return lin.mean(1)
    total = gb.sum()  # weighted: Σ_c (ḡ_c / Σḡ) m_c, its weights linearised too
    w = gb / total
    return (w * lin).sum(1) + ((g - gb) / total * m).sum(1) - (m * w).sum() * ((g.sum(1) - total) / total)


# --------------------------------------------------------------------------------------------------------------------
# Variance components (examples × seeds) and the difference of two arms
# --------------------------------------------------------------------------------------------------------------------


def components(y: np.ndarray) -> dict[str, Any]:
    """Variance components of one arm's (n examples, k seeds) table of per-example scores (leading axes: a batch of
    tables, as in the simulation tests): ``seed_var`` — variance of its per-seed scores (s²), ``interaction`` — the
    example × seed mean square (MSE, estimates the interaction variance σ²_e), and ``seed_component`` =
    max(0, s² − MSE/n), the estimate of the seeds' own variance σ²_b."""
    n, k = y.shape[-2:]
    if k < 2:
        nan = np.full(y.shape[:-2], np.nan)
        return {"n": n, "k": k, "seed_var": nan, "interaction": nan, "seed_component": nan}
    col = y.mean(-2, dtype=np.float64)
    row = y.mean(-1, dtype=np.float64)
    grand = col.mean(-1)
    # Σ(y − ȳ_i. − ȳ_.j + ȳ)² = Σy² − kΣȳ_i.² − nΣȳ_.j² + nkȳ² (two passes over y, no (n, k) temporaries)
    ss = (np.square(y, dtype=np.float64).sum((-2, -1)) - k * np.square(row).sum(-1) - n * np.square(col).sum(-1)
          + n * k * grand ** 2)
    mse = np.maximum(ss, 0.0) / ((n - 1) * (k - 1))
    s2 = col.var(-1, ddof=1)
    return {"n": n, "k": k, "seed_var": s2, "interaction": mse, "seed_component": np.maximum(0.0, s2 - mse / n)}


def _satterthwaite(terms: list[tuple[Any, Any]]) -> np.ndarray:
    """Welch–Satterthwaite degrees of freedom of a sum of independent variance terms ``(value, df)`` (inf when
    every term is 0)."""
    total = sum(np.asarray(v, dtype=float) for v, _ in terms)
    denom = sum(np.where(np.asarray(v) > 0, np.asarray(v, dtype=float) ** 2 / np.asarray(d, dtype=float), 0.0)
                for v, d in terms)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, total * total / np.where(denom > 0, denom, 1.0), np.inf)


def _seed_term(c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' contribution max(0, s² − MSE/n)/k to a mean's variance, with its Satterthwaite df (NaN with one
    seed: unknown)."""
    n, k = c["n"], c["k"]
    if k < 2:
        return c["seed_var"], c["seed_var"]
    value = c["seed_component"] / k
    a, b = c["seed_var"] / k, c["interaction"] / (n * k)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(value > 0, (a - b) ** 2 / (a * a / (k - 1) + b * b / ((n - 1) * (k - 1))), np.inf)
    return value, df


def _scalar(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, np.ndarray) and v.ndim == 0 else v) for k, v in d.items()}


def mean_interval(y: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """Mean of one arm over seeds and test examples with a CI covering both: V = var_i(row means)/n + seed term
    (as :func:`difference`). With one seed only test-set sampling is covered (``covers`` says which)."""
    n, k = y.shape
    mean = float(y.mean())
    test_var = float(y.mean(1).var(ddof=1)) / n if n > 1 else float("nan")
    if k >= 2:
        seed_value, seed_df = _seed_term(components(y))
        var, covers = test_var + float(seed_value), "seeds + test examples"
        df = float(_satterthwaite([(test_var, n - 1), (seed_value, seed_df)]))
    else:
        var, covers, df = test_var, "test examples only (1 seed)", n - 1
    if not np.isfinite(var) or var <= 0:
        return {"mean": mean, "low": mean, "high": mean, "se": 0.0, "df": df, "covers": covers}
    q = stats.t.ppf(0.5 + confidence / 2, df)
    se = math.sqrt(var)
    return {"mean": mean, "low": mean - q * se, "high": mean + q * se, "se": se, "df": df, "covers": covers}


def difference(cand: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Δ = candidate − reference (fractions) from the two arms' (n, k) per-example score tables (same examples, in
    the same row order; seeds need not match; leading axes: a batch), its variance over seeds and test examples,
    Satterthwaite df, and the variance components behind them (for planning)."""
    n = cand.shape[-2]
    cc, cr = components(cand), components(ref)
    x = cand.mean(-1, dtype=np.float64) - ref.mean(-1, dtype=np.float64)
    x_var = x.var(-1, ddof=1)
    test_var = x_var / n
    seed_c, df_c = _seed_term(cc)
    seed_r, df_r = _seed_term(cr)
    var = test_var + seed_c + seed_r
    out = {"diff": cand.mean((-2, -1), dtype=np.float64) - ref.mean((-2, -1), dtype=np.float64), "n": n, "k_cand": cc["k"], "k_ref": cr["k"],
           "var": var, "test_var": test_var, "seed_var_cand": seed_c, "seed_var_ref": seed_r,
           "comp_cand": _scalar(cc), "comp_ref": _scalar(cr),
           # the example effect's variance, without the interaction that the seed means still carry
           "example_var": np.maximum(0.0, x_var - np.nan_to_num(cc["interaction"]) / cc["k"]
                                     - np.nan_to_num(cr["interaction"]) / cr["k"]),
           "se": np.sqrt(np.maximum(var, 0.0)),
           "df": np.where(np.isfinite(var), _satterthwaite([(test_var, n - 1), (np.nan_to_num(seed_c), df_c),
                                                            (np.nan_to_num(seed_r), df_r)]), np.nan)}
    return _scalar(out)


def one_sided_p(diff: Any, se: Any, df: Any, margin: float) -> dict[str, Any]:
    """p-values of the three one-sided tests (fractions in, margin in fractions; arrays work too):
    ``p_noninferior`` (H0: Δ ≤ −margin), ``p_inferior`` (H0: Δ ≥ −margin) and ``p_superior`` (H0: Δ ≤ 0). With no
    variation at all (se = 0: identical predictions of deterministic arms) the sign decides; NaN se: untested."""
    diff, se, df = (np.asarray(a, dtype=float) for a in (diff, se, df))
    safe = np.where(se > 0, se, 1.0)
    t_margin, t_zero = (diff + margin) / safe, diff / safe
    zero = se == 0
    out = {"p_noninferior": np.where(zero, (diff <= -margin).astype(float), stats.t.sf(t_margin, df)),
           "p_inferior": np.where(zero, (diff >= -margin).astype(float), stats.t.cdf(t_margin, df)),
           "p_superior": np.where(zero, (diff <= 0).astype(float), stats.t.sf(t_zero, df))}
    bad = ~np.isfinite(se) | ~np.isfinite(df)
    return _scalar({k: np.where(bad, np.nan, v) for k, v in out.items()})


def holm(pvalues: list[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values (NaN stays NaN and does not count as a hypothesis)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


# --------------------------------------------------------------------------------------------------------------------
# Planning: what would decide an undecided comparison
# --------------------------------------------------------------------------------------------------------------------


def projected_var(d: dict[str, Any], k: float, n: float) -> tuple[float, float]:
    """Variance of Δ and its df if both arms had ``k`` seeds and the test set ``n`` examples, at the estimated
    components (example effect, each arm's seed variance and interaction)."""
    cc, cr = d["comp_cand"], d["comp_ref"]
    inter = np.nan_to_num(cc["interaction"]) + np.nan_to_num(cr["interaction"])
    seeds = np.nan_to_num(cc["seed_component"]) + np.nan_to_num(cr["seed_component"])
    test = (d["example_var"] + inter / k) / n
    seed = seeds / k
    return float(test + seed), float(_satterthwaite([(test, n - 1), (seed, max(k - 1, 1))]))


def _power_ok(distance: float, var: float, df: float, alpha: float, power: float) -> bool:
    if var <= 0:
        return distance > 0
    return distance / math.sqrt(var) >= stats.t.ppf(1 - alpha, df) + stats.t.ppf(power, df)


def plan(d: dict[str, Any], margin: float, alpha: float = ALPHA, power: float = POWER) -> dict[str, Any]:
    """Seeds (at the current test-set size) and test examples (at the current seeds) that would decide the comparison
    — non-inferior or inferior — with ``power``, if the true Δ were the estimated one and the variance components as
    estimated. ``None`` where no number can (Δ at the margin), ``bottleneck`` says what limits."""
    distance = abs(d["diff"] + margin)
    k_now = min(d["k_cand"], d["k_ref"])
    n_now = d["n"]
    out: dict[str, Any] = {"seeds_needed": None, "test_examples_needed": None}
    if not np.isfinite(d.get("var", np.nan)) or distance == 0:
        out["bottleneck"] = "Δ equals the margin: no study size decides" if distance == 0 else "too few seeds"
        return out
    k = next((k for k in range(2, MAX_SEEDS_PLANNED + 1)
              if _power_ok(distance, *projected_var(d, k, n_now), alpha, power)), None)
    out["seeds_needed"] = k
    n_exp = next((int(n) for n in np.unique(np.geomspace(max(n_now, 10), MAX_EXAMPLES_PLANNED, 200).astype(int))
                  if _power_ok(distance, *projected_var(d, max(k_now, 2), n), alpha, power)), None)
    out["test_examples_needed"] = n_exp
    if k is None:
        out["bottleneck"] = ("test set: more seeds cannot decide at this test-set size"
                             if n_exp is not None else "both: more seeds cannot decide at this test-set size, nor "
                             "a larger test set at these seeds")
    elif n_exp is None:
        out["bottleneck"] = "seeds: a larger test set alone cannot decide at these seeds"
    else:
        out["bottleneck"] = "seeds or test set"
    return out


# --------------------------------------------------------------------------------------------------------------------
# Sequential looks: alpha spending
# --------------------------------------------------------------------------------------------------------------------


def spent(t: float, alpha: float = ALPHA) -> float:
    """Lan–DeMets Pocock-type spending function α·ln(1 + (e − 1)·t) (Lan & DeMets 1983), t = information fraction."""
    return alpha * math.log(1 + (math.e - 1) * min(max(t, 0.0), 1.0))


def look_schedule(first: int, step: int, max_seeds: int) -> list[int]:
    """Seeds per arm at each planned look: ``first``, ``first + step``, … up to ``max_seeds``."""
    looks = list(range(first, max_seeds, max(step, 1))) + [max_seeds]
    return sorted(set(k for k in looks if k >= first))


def look_levels(schedule: list[int], alpha: float = ALPHA) -> list[float]:
    """Nominal one-sided level of each look: the alpha spent between it and the previous one, with information
    fraction = seeds / the last look's seeds. They add up to ``alpha``."""
    last = schedule[-1]
    fractions = [k / last for k in schedule]
    return [spent(t, alpha) - spent(prev, alpha) for prev, t in zip([0.0] + fractions[:-1], fractions)]


# --------------------------------------------------------------------------------------------------------------------
# From stored predictions to verdicts
# --------------------------------------------------------------------------------------------------------------------


def shared_ids(frames: list[pd.DataFrame]) -> list:
    """Test example ids present in every frame."""
    return sorted(set.intersection(*(set(f["id"]) for f in frames))) if frames else []


def on_ids(frames: dict[Any, pd.DataFrame], ids: list) -> dict[Any, pd.DataFrame]:
    """Each seed's predictions indexed by example id, restricted to ``ids`` in that order (done once per frame)."""
    return {seed: f.drop_duplicates("id").set_index("id").loc[ids] for seed, f in frames.items()}


def score_table(by_id: dict[Any, pd.DataFrame], metric: str, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Gold labels (n,) and the (n, seeds) table of per-example scores (:func:`influence`) of frames aligned by
    :func:`on_ids`. A column's mean is that seed's metric."""
    frames = list(by_id.values())
    labels = frames[0]["label"].to_numpy()
    table = np.column_stack([influence(labels, f["pred"].to_numpy(), metric, num_labels) for f in frames])
    return labels, table


def _num_labels(frames: list[pd.DataFrame], num_labels: int | None) -> int:
    return num_labels or int(max(max(f["label"].max(), f["pred"].max()) for f in frames)) + 1


def arm_interval(frames: dict[Any, pd.DataFrame], metric: str = "accuracy", num_labels: int | None = None,
                 confidence: float = 0.95) -> dict[str, Any] | None:
    """An arm's mean ``metric`` over its seeds with a CI over seeds and test examples (:func:`mean_interval`);
    None without predictions."""
    if not frames:
        return None
    ids = shared_ids(list(frames.values()))
    if len(ids) < 2:
        return None
    _, table = score_table(on_ids(frames, ids), metric, _num_labels(list(frames.values()), num_labels))
    return mean_interval(table, confidence)


def compare(ref: dict[Any, pd.DataFrame], cand: dict[Any, pd.DataFrame], margin: float = 1.0,
            metric: str = "accuracy", num_labels: int | None = None, alpha: float = ALPHA) -> dict[str, Any]:
    """Candidate vs reference on their stored test predictions (``{seed: predictions frame}`` each). ``margin`` is
    in points. Returns the numbers behind the verdict (points): seeds of each arm, test examples, both scores, Δ, its
    interval at one-sided level ``alpha`` (two-sided 1 − 2α), the variance parts, Satterthwaite df, the unadjusted
    one-sided p-values, the per-seed McNemar p-values (descriptive only) and the planning numbers. The verdict itself
    needs the other arms (Holm): :func:`decide_all`."""
    out: dict[str, Any] = {"metric": metric, "margin": margin, "alpha": alpha}
    if not ref or not cand:
        return {**out, "verdict": NOT_TESTED, "reason": "the reference or the candidate has no predictions.parquet"}
    frames = list(ref.values()) + list(cand.values())
    ids = shared_ids(frames)
    out.update(seeds_reference=len(ref), seeds=len(cand), n_examples=len(ids),
               seed_list_reference=" ".join(map(str, sorted(ref, key=str))),
               seed_list=" ".join(map(str, sorted(cand, key=str))))
    if len(ids) < 2:
        return {**out, "verdict": NOT_TESTED, "reason": "the runs share fewer than 2 test example ids"}
    kinds = _num_labels(frames, num_labels)
    ref, cand = on_ids(ref, ids), on_ids(cand, ids)
    _, ref_table = score_table(ref, metric, kinds)
    _, cand_table = score_table(cand, metric, kinds)
    d = difference(cand_table, ref_table)
    m = margin / 100.0
    ref_scores, cand_scores = ref_table.mean(0), cand_table.mean(0)  # each seed's metric (influence means)
    out.update(reference_score=100 * float(np.mean(ref_scores)), candidate_score=100 * float(np.mean(cand_scores)),
               diff_points=100 * (float(np.mean(cand_scores)) - float(np.mean(ref_scores))),
               se_points=100 * d["se"], df=d["df"], test_se_points=100 * math.sqrt(d["test_var"]),
               seed_se_points=100 * math.sqrt(np.nan_to_num(d["seed_var_cand"]) + np.nan_to_num(d["seed_var_ref"])),
               seed_std_reference=100 * float(np.std(ref_scores, ddof=1)) if len(ref) > 1 else float("nan"),
               seed_std_candidate=100 * float(np.std(cand_scores, ddof=1)) if len(cand) > 1 else float("nan"))
    if np.isfinite(d["se"]) and np.isfinite(d["df"]):
        q = stats.t.ppf(1 - alpha, d["df"]) if d["se"] > 0 else 0.0
        out["ci_low"], out["ci_high"] = 100 * (d["diff"] - q * d["se"]), 100 * (d["diff"] + q * d["se"])
    else:
        out["ci_low"] = out["ci_high"] = float("nan")
    out.update(one_sided_p(d["diff"], d["se"], d["df"], m))
    out["mcnemar_p_per_seed"] = " ".join(f"{p:.2g}" for p in mcnemar_per_seed(ref, cand))
    out.update(plan(d, m, alpha))
    return out


def mcnemar_per_seed(ref: dict[Any, pd.DataFrame], cand: dict[Any, pd.DataFrame]) -> list[float]:
    """McNemar's exact test (binomial on the discordant examples) for each common seed, else each pair in sorted
    order, of frames aligned by :func:`on_ids` — descriptive only: pooling seeds would treat correlated pairs as
    independent."""
    common = sorted(set(ref) & set(cand), key=str)
    pairs = [(s, s) for s in common] or list(zip(sorted(ref, key=str), sorted(cand, key=str)))
    out = []
    for a, b in pairs:
        r, c = ref[a], cand[b]
        r_ok, c_ok = (r["pred"] == r["label"]).to_numpy(), (c["pred"] == c["label"]).to_numpy()
        lo, hi = int((r_ok & ~c_ok).sum()), int((~r_ok & c_ok).sum())
        out.append(float(stats.binomtest(hi, lo + hi, 0.5).pvalue) if lo + hi else 1.0)
    return out


def decide_all(rows: list[dict[str, Any]], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Verdicts of all arms compared with one reference. For each arm exactly one of "Δ ≤ −margin" and
    "Δ ≥ −margin" can be false, so its two one-sided tests need no split of α (the partitioning principle, Finner &
    Strassburger 2002); across arms, the decisive p-value min(p_noninferior, p_inferior) is Holm-adjusted and a
    rejection is claimed in its direction (directional Holm, Shaffer 1980; Finner 1999). Superiority is claimed for an
    arm already non-inferior when its Holm-adjusted p_superior ≤ ``alpha`` as well. Adds ``p_decision_holm``,
    ``p_superior_holm``, ``holm_arms``, ``verdict`` and ``reason`` to each row (rows without a test keep theirs)."""
    tested = [r for r in rows if "p_noninferior" in r]
    decisive = [min(r["p_noninferior"], r["p_inferior"]) for r in tested]
    for r, p, q in zip(tested, holm(decisive), holm([r["p_superior"] for r in tested])):
        r["p_decision_holm"], r["p_superior_holm"] = p, q
    m = sum(np.isfinite(p) for p in decisive)
    for r in tested:
        r["holm_arms"] = m
        span = f"{100 * (1 - 2 * r['alpha']):.3g}% CI [{signed(r['ci_low'])}, {signed(r['ci_high'])}]"
        adj = f"Holm-adjusted over {m} arm(s)" if m > 1 else "one arm compared"
        p = r["p_decision_holm"]
        if not np.isfinite(r["p_noninferior"]):
            r["verdict"] = UNDECIDED
            r["reason"] = ("fewer than 2 seeds in an arm: the seed-to-seed variance is unknown; "
                           "needs ≥ 2 seeds per arm")
            continue
        if p <= alpha and r["p_noninferior"] <= r["p_inferior"]:
            if r["p_superior_holm"] <= alpha:
                r["verdict"], why = SUPERIOR, f"{span} lies above 0 (p = {r['p_superior_holm']:.2g}, {adj})"
            else:
                r["verdict"], why = NON_INFERIOR, f"{span} lies above −{r['margin']:g} (p = {p:.2g}, {adj})"
        elif p <= alpha:
            r["verdict"], why = INFERIOR, f"{span} lies below −{r['margin']:g} (p = {p:.2g}, {adj})"
        else:
            r["verdict"], why = UNDECIDED, (f"{span} contains −{r['margin']:g} or its adjusted p = {p:.2g} > "
                                            f"{r['alpha']:.3g} ({adj}); " + plan_text(r))
        r["reason"] = why
    return rows


def plan_text(r: dict[str, Any]) -> str:
    """What would decide an undecided comparison, in words."""
    k, n = r.get("seeds_needed"), r.get("test_examples_needed")
    seeds = f"{k} seeds per arm at {r['n_examples']:,} test examples" if k else "no number of seeds at this test set"
    examples = (f"{n:,} test examples at {min(r['seeds'], r['seeds_reference'])} seeds" if n else
                "no test-set size at these seeds")
    return f"80% power to decide needs {seeds}, or {examples} ({r.get('bottleneck', '')})"


def signed(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.2f}".replace("-", "−")


def judge(ref: dict[Any, pd.DataFrame], cand: dict[Any, pd.DataFrame], margin: float = 1.0,
          metric: str = "accuracy", num_labels: int | None = None, alpha: float = ALPHA) -> dict[str, Any]:
    """:func:`compare` and :func:`decide_all` for a single candidate (no other arms to adjust for)."""
    return decide_all([compare(ref, cand, margin, metric, num_labels, alpha)], alpha)[0]

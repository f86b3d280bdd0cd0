"""The hypothesis verdict: is a candidate arm non-inferior to the reference arm on the same test examples?

Pure functions on stored test predictions (``predictions.parquet`` frames: ``id``, ``label``, ``pred``, …), one per
seed. How the verdict is decided (docs/report.md has the long version):

1. Pair reference seed *s* with candidate seed *s* (seeds both arms have; if they share none, pair them in sorted
   order) and keep the test examples (``id``) present in every paired run.
2. The difference *d* = candidate − reference of the headline metric, seeds pooled, in points (100 · fraction).
3. Its 95% CI: a paired bootstrap over test examples (an example keeps its outcomes under every seed of both arms;
   ``scipy.stats.bootstrap``, percentile). McNemar's exact test (``scipy.stats.binomtest`` on the discordant pairs,
   seeds pooled) is reported beside it.
4. Seed noise: each arm's seed-to-seed standard deviation of the metric (points, over all its seeds); ``noise`` is the
   larger one, ``seed_se`` = sqrt((std_ref² + std_cand²) / k) the standard error the seeds add to *d* (k paired
   seeds). Unknown with fewer than 2 seeds per arm → "inconclusive — more seeds needed".
5. The decision interval is the CI widened to at least *d* ± seed_se. Non-inferior if its low end > −margin;
   inferior if its high end < −margin *and* |d| > noise (a difference smaller than the seed noise is never claimed);
   otherwise inconclusive. More seeds shrink seed_se, which is why "more seeds needed" is the advice.

Example::

    >>> from peftbench.report.verdict import decide
    >>> decide(diff=-0.2, low=-0.6, high=0.2, noise=0.3, seed_se=0.25, margin=1.0, seeds=3)[0]
    'non-inferior'
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm

NON_INFERIOR = "non-inferior"
INFERIOR = "inferior"
INCONCLUSIVE = "inconclusive — more seeds needed"
NOT_TESTED = "not tested — no stored predictions"


def score(labels: np.ndarray, preds: np.ndarray, metric: str = "accuracy", weights: np.ndarray | None = None) -> float:
    """A headline metric of hard predictions (accuracy, f1_macro, f1_weighted, precision_*, recall_*)."""
    if metric == "accuracy":
        return float(skm.accuracy_score(labels, preds, sample_weight=weights))
    kind, avg = metric.rsplit("_", 1)
    func = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[kind]
    return float(func(labels, preds, average=avg, sample_weight=weights, zero_division=0))


def pair_seeds(ref_seeds, cand_seeds) -> list[tuple[Any, Any]]:
    """(reference seed, candidate seed) pairs: the common seeds, else both lists in sorted order."""
    common = sorted(set(ref_seeds) & set(cand_seeds))
    if common:
        return [(s, s) for s in common]
    return list(zip(sorted(ref_seeds), sorted(cand_seeds)))


def aligned(ref: dict[Any, pd.DataFrame], cand: dict[Any, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                      list[tuple[Any, Any]]]:
    """Gold labels (n,), reference and candidate predictions (n, pairs) on the test ids shared by all paired runs."""
    pairs = pair_seeds(ref, cand)
    frames = [ref[a] for a, _ in pairs] + [cand[b] for _, b in pairs]
    ids = sorted(set.intersection(*(set(f["id"]) for f in frames))) if frames else []
    if not ids:
        return np.empty(0, int), np.empty((0, 0), int), np.empty((0, 0), int), pairs
    by_id = [f.drop_duplicates("id").set_index("id").loc[ids] for f in frames]
    labels = by_id[0]["label"].to_numpy()
    ref_preds = np.column_stack([f["pred"].to_numpy() for f in by_id[:len(pairs)]])
    cand_preds = np.column_stack([f["pred"].to_numpy() for f in by_id[len(pairs):]])
    return labels, ref_preds, cand_preds, pairs


def decide(diff: float, low: float, high: float, noise: float, seed_se: float, margin: float,
           seeds: int) -> tuple[str, str]:
    """The verdict and a one-line reason. ``diff``, ``low``, ``high`` (its CI over test examples), ``noise`` (the
    larger seed std), ``seed_se`` (the seeds' standard error of ``diff``) and ``margin`` are in points; ``seeds`` is
    the number of paired seeds."""
    if seeds < 2 or not np.isfinite(noise) or not np.isfinite(seed_se):
        return INCONCLUSIVE, (f"{seeds} paired seed(s): the seed-to-seed noise is unknown, so no difference can be "
                              f"told from it")
    low_eff, high_eff = min(low, diff - seed_se), max(high, diff + seed_se)
    span = f"[{low_eff:+.2f}, {high_eff:+.2f}] (CI widened to at least ±{seed_se:.2f}, the seeds' standard error)"
    if low_eff > -margin:
        return NON_INFERIOR, f"{span} lies above −{margin:g}"
    if high_eff < -margin:
        if abs(diff) > noise:
            return INFERIOR, f"{span} lies below −{margin:g} and |Δ| > the seed noise {noise:.2f}"
        return INCONCLUSIVE, f"{span} lies below −{margin:g}, but |Δ| is within the seed noise {noise:.2f}"
    return INCONCLUSIVE, f"{span} contains −{margin:g}"


def compare(ref: dict[Any, pd.DataFrame], cand: dict[Any, pd.DataFrame], margin: float = 1.0,
            metric: str = "accuracy", confidence: float = 0.95, n_resamples: int = 2000,
            random_state: int = 0) -> dict[str, Any]:
    """Candidate vs reference on their stored test predictions (``{seed: predictions frame}`` each).

    Returns the numbers behind the verdict: paired seeds, examples, both scores and their difference (points, seeds
    pooled), its bootstrap CI, McNemar's discordant counts (``ref_only_right``, ``cand_only_right``) and exact
    p-value, each arm's seed-to-seed std (over all its seeds), the noise and seed standard error used, the verdict and
    its reason."""
    out: dict[str, Any] = {"metric": metric, "margin": margin}
    if not ref or not cand:
        return {**out, "verdict": NOT_TESTED, "reason": "the reference or the candidate has no predictions.parquet"}
    labels, ref_preds, cand_preds, pairs = aligned(ref, cand)
    k, n = len(pairs), len(labels)
    out.update(seeds=k, seed_pairs=" ".join(f"{a}/{b}" for a, b in pairs), n_examples=n)
    if not n:
        return {**out, "verdict": NOT_TESTED, "reason": "the paired runs share no test example ids"}

    def pooled(lab, rp, cp, weights=None):
        w = None if weights is None else np.asarray(weights)
        return np.mean([score(lab, cp[:, j], metric, w) - score(lab, rp[:, j], metric, w) for j in range(k)])

    ref_score = np.mean([score(labels, ref_preds[:, j], metric) for j in range(k)])
    cand_score = np.mean([score(labels, cand_preds[:, j], metric) for j in range(k)])
    diff = 100.0 * (cand_score - ref_score)
    rng = np.random.default_rng(random_state)
    if metric == "accuracy":
        # Per-example mean correctness difference over the seed pairs: its mean is the pooled accuracy difference.
        per_example = ((cand_preds == labels[:, None]).mean(axis=1) - (ref_preds == labels[:, None]).mean(axis=1))
        if np.allclose(per_example, per_example[0]):
            low = high = float(per_example[0])
        else:
            res = stats.bootstrap((per_example,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                  method="percentile", vectorized=True, axis=-1, random_state=rng)
            low, high = res.confidence_interval.low, res.confidence_interval.high
    else:
        # Other metrics are not means over examples: resample example indices, recompute the metric per seed pair.
        idx = np.arange(n)
        res = stats.bootstrap((idx,), lambda i: pooled(labels[i], ref_preds[i], cand_preds[i]),
                              confidence_level=confidence, n_resamples=min(n_resamples, 500), method="percentile",
                              vectorized=False, random_state=rng)
        low, high = res.confidence_interval.low, res.confidence_interval.high
    low, high = 100.0 * float(low), 100.0 * float(high)

    ref_right, cand_right = ref_preds == labels[:, None], cand_preds == labels[:, None]
    b = int((ref_right & ~cand_right).sum())
    c = int((~ref_right & cand_right).sum())
    p_value = float(stats.binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0

    def seed_std(frames: dict[Any, pd.DataFrame]) -> float:
        values = [100.0 * score(f["label"].to_numpy(), f["pred"].to_numpy(), metric) for f in frames.values()]
        return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    std_ref, std_cand = seed_std(ref), seed_std(cand)
    known = np.isfinite([std_ref, std_cand]).all()
    noise = max(std_ref, std_cand) if known else float("nan")
    seed_se = float(np.sqrt((std_ref ** 2 + std_cand ** 2) / k)) if known else float("nan")
    verdict, reason = decide(diff, low, high, noise, seed_se, margin, min(k, len(ref), len(cand)))
    out.update(reference_score=100.0 * ref_score, candidate_score=100.0 * cand_score, diff_points=diff,
               ci_low=low, ci_high=high, ref_only_right=b, cand_only_right=c, mcnemar_p=p_value,
               seed_std_reference=std_ref, seed_std_candidate=std_cand, noise=noise, seed_se=seed_se,
               verdict=verdict, reason=reason)
    return out

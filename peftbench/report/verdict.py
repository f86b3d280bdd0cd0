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

NON_INFERIOR = "non-inferior"
INFERIOR = "inferior"
INCONCLUSIVE = "inconclusive — more seeds needed"
NOT_TESTED = "not tested — no stored predictions"


def class_counts(labels: np.ndarray, preds: np.ndarray, idx: np.ndarray, num_labels: int) -> tuple[np.ndarray, ...]:
    """Per-class true positives, predicted and gold counts, each (resamples, num_labels), of the example indices
    ``idx`` (resamples, n) — one ``np.bincount`` per count, so thousands of bootstrap resamples stay cheap. A
    prediction of -1 (no label), or of an id >= num_labels, is never a class."""
    rows = np.arange(idx.shape[0])[:, None] * num_labels

    def count(values):
        v = values[idx]
        keep = (v >= 0) & (v < num_labels)
        return np.bincount((rows + v)[keep], minlength=idx.shape[0] * num_labels).reshape(idx.shape[0], num_labels)

    return count(np.where(labels == preds, labels, -1)), count(preds), count(labels)


def from_counts(tp: np.ndarray, predicted: np.ndarray, gold: np.ndarray, metric: str) -> np.ndarray:
    """Accuracy, or precision / recall / F1 averaged ``macro`` (every class counts, like peftbench.evaluate) or
    ``weighted`` (by gold support), from per-class counts; 0 where a class is undefined (scikit-learn's
    ``zero_division=0``). The tests check it equals scikit-learn."""
    tp, predicted, gold = (np.asarray(a, dtype=float) for a in (tp, predicted, gold))
    if metric == "accuracy":
        return tp.sum(-1) / gold.sum(-1)
    kind, avg = metric.rsplit("_", 1)
    denominator = {"precision": predicted, "recall": gold, "f1": (predicted + gold) / 2}[kind]
    per_class = np.divide(tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    if avg == "macro":
        return per_class.mean(-1)
    return (per_class * gold).sum(-1) / gold.sum(-1)


def score(labels: np.ndarray, preds: np.ndarray, metric: str = "accuracy", num_labels: int | None = None) -> float:
    """A headline metric of hard predictions (accuracy, f1_macro, f1_weighted, precision_*, recall_*)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    k = num_labels or int(max(labels.max(), preds.max())) + 1
    idx = np.arange(len(labels))[None, :]
    return float(from_counts(*class_counts(labels, preds, idx, k), metric)[0])


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
    span = (f"[{low_eff:+.2f}, {high_eff:+.2f}]".replace("-", "−")
            + f" (CI widened to at least ±{seed_se:.2f}, the seeds' standard error)")
    if low_eff > -margin:
        return NON_INFERIOR, f"{span} lies above −{margin:g}"
    if high_eff < -margin:
        if abs(diff) > noise:
            return INFERIOR, f"{span} lies below −{margin:g} and |Δ| > the seed noise {noise:.2f}"
        return INCONCLUSIVE, f"{span} lies below −{margin:g}, but |Δ| is within the seed noise {noise:.2f}"
    return INCONCLUSIVE, f"{span} contains −{margin:g}"


def compare(ref: dict[Any, pd.DataFrame], cand: dict[Any, pd.DataFrame], margin: float = 1.0,
            metric: str = "accuracy", num_labels: int | None = None, confidence: float = 0.95,
            n_resamples: int = 2000, random_state: int = 0) -> dict[str, Any]:
    """Candidate vs reference on their stored test predictions (``{seed: predictions frame}`` each). ``num_labels``
    (default: inferred) makes macro averages count every class, as result.json's metrics do.

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

    kinds = num_labels or int(max(labels.max(), ref_preds.max(), cand_preds.max())) + 1

    def pooled_diff(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        """Candidate − reference metric, averaged over the seed pairs, of each resample of example indices."""
        idx = np.atleast_2d(idx)
        diffs = [from_counts(*class_counts(labels, cand_preds[:, j], idx, kinds), metric)
                 - from_counts(*class_counts(labels, ref_preds[:, j], idx, kinds), metric) for j in range(k)]
        return np.mean(diffs, axis=0)

    ref_score = np.mean([score(labels, ref_preds[:, j], metric, kinds) for j in range(k)])
    cand_score = np.mean([score(labels, cand_preds[:, j], metric, kinds) for j in range(k)])
    diff = 100.0 * (cand_score - ref_score)
    # Paired bootstrap over test examples: a resampled example keeps its outcomes under every seed of both arms.
    res = stats.bootstrap((np.arange(n),), pooled_diff, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", vectorized=True, batch=100, random_state=random_state)
    low, high = 100.0 * float(res.confidence_interval.low), 100.0 * float(res.confidence_interval.high)
    if not np.isfinite([low, high]).all():  # every resample identical (e.g. identical predictions): no spread
        low = high = diff

    ref_right, cand_right = ref_preds == labels[:, None], cand_preds == labels[:, None]
    b = int((ref_right & ~cand_right).sum())
    c = int((~ref_right & cand_right).sum())
    p_value = float(stats.binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0

    def seed_std(frames: dict[Any, pd.DataFrame]) -> float:
        values = [100.0 * score(f["label"].to_numpy(), f["pred"].to_numpy(), metric, kinds) for f in frames.values()]
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

"""Calibration of the stored test probabilities: expected calibration error (ECE) and reliability bins per arm.

Top-label calibration: each test prediction's confidence is its largest class probability, and it is right when the
predicted class is the gold one. The confidences are cut into ``N_BINS`` = 15 equal-width bins ((m−1)/M, m/M] and

    ECE = Σ_m (n_m / N) · |accuracy_m − mean confidence_m|

(Naeini, Cooper & Hauskrecht 2015, "Obtaining well calibrated probabilities using Bayesian binning", AAAI; Guo, Pleiss,
Sun & Weinberger 2017, "On calibration of modern neural networks", ICML — whose 15 bins this follows). The per-bin
accuracy and confidence come from :func:`sklearn.calibration.calibration_curve` (``strategy="uniform"``). Methods
without probabilities (an llm arm, NaN probs) have no calibration. Pure.

Example::

    >>> import numpy as np
    >>> bins = reliability(np.array([0.95, 0.95, 0.65, 0.65]), np.array([1, 1, 1, 0]))
    >>> bins[["n", "accuracy", "confidence"]].values.tolist()
    [[2.0, 0.5, 0.65], [2.0, 1.0, 0.95]]
    >>> round(ece(bins), 3)   # ½·|0.5 − 0.65| + ½·|1 − 0.95|
    0.1
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve

N_BINS = 15


def top_label(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, correct)`` of one run's predictions: the largest class probability of each row and whether the
    prediction is right; rows without probabilities are left out."""
    if "probs" not in frame.columns or not len(frame):
        return np.array([]), np.array([])
    probs = [np.asarray(p, dtype=float) for p in frame["probs"]]
    conf = np.array([p.max() if p.size and not np.isnan(p).any() else np.nan for p in probs])
    keep = ~np.isnan(conf)
    correct = (frame["pred"].to_numpy() == frame["label"].to_numpy()).astype(int)
    return np.clip(conf[keep], 0.0, 1.0), correct[keep]


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """The non-empty equal-width confidence bins: ``low``, ``high``, ``n`` (predictions), ``accuracy`` and mean
    ``confidence`` (from :func:`sklearn.calibration.calibration_curve`)."""
    cols = ["low", "high", "n", "accuracy", "confidence"]
    if not len(confidence):
        return pd.DataFrame(columns=cols)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    accuracy, mean_conf = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    # the same bin ids as calibration_curve ((low, high], the first bin closed): only to count each bin's predictions
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    full = counts > 0
    return pd.DataFrame({"low": edges[:-1][full], "high": edges[1:][full], "n": counts[full].astype(float),
                         "accuracy": accuracy, "confidence": mean_conf}, columns=cols)


def ece(bins: pd.DataFrame) -> float:
    """Expected calibration error of :func:`reliability`'s bins (a fraction; NaN without predictions)."""
    if not len(bins):
        return float("nan")
    return float((bins["n"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / bins["n"].sum())


def arm_calibration(frames: dict[Any, pd.DataFrame], n_bins: int = N_BINS) -> tuple[dict[str, Any], pd.DataFrame]:
    """One arm's calibration: a summary (``ece`` of all seeds' predictions pooled, ``ece_seed_mean`` /
    ``ece_seed_std`` over its seeds, ``confidence`` and ``accuracy`` means, ``n`` predictions, ``seeds``) and the
    pooled reliability bins. ``({}, empty)`` when no prediction has probabilities."""
    parts = [top_label(f) for f in frames.values()]
    parts = [(c, k) for c, k in parts if len(c)]
    if not parts:
        return {}, reliability(np.array([]), np.array([]))
    conf, correct = np.concatenate([c for c, _ in parts]), np.concatenate([k for _, k in parts])
    bins = reliability(conf, correct, n_bins)
    per_seed = [ece(reliability(c, k, n_bins)) for c, k in parts]
    return {"ece": ece(bins), "ece_seed_mean": float(np.mean(per_seed)),
            "ece_seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan"),
            "confidence": float(conf.mean()), "accuracy": float(correct.mean()), "n": int(len(conf)),
            "seeds": len(parts)}, bins


def calibration_table(arms: dict[str, dict[Any, pd.DataFrame]],
                      n_bins: int = N_BINS) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Every arm with probabilities: ``(table, bins)`` — one summary row per arm (:func:`arm_calibration`) and each
    arm's reliability bins."""
    rows, bins = [], {}
    for arm, frames in arms.items():
        summary, arm_bins = arm_calibration(frames, n_bins)
        if summary:
            rows.append({"arm": arm, **summary})
            bins[arm] = arm_bins
    cols = ["arm", "ece", "ece_seed_mean", "ece_seed_std", "confidence", "accuracy", "n", "seeds"]
    return pd.DataFrame(rows, columns=cols), bins

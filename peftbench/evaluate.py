"""Predictions → metrics, with scikit-learn. Pure functions: no model, no I/O.

Example::

    >>> import numpy as np
    >>> from peftbench.evaluate import compute_metrics
    >>> m = compute_metrics(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    >>> round(m["accuracy"], 3), m["n"]
    (0.667, 3)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

# The test metrics every run stores (compute_metrics), in the report's column order: the one list of them.
METRICS = ("accuracy", "f1_weighted", "f1_macro", "precision_weighted", "recall_weighted", "precision_macro",
           "recall_macro", "roc_auc")


def compute_metrics(labels: np.ndarray, probs: np.ndarray, num_labels: int | None = None) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (weighted and macro), ROC-AUC (binary, or one-vs-rest macro), log loss and the
    confusion matrix (rows = gold, columns = predicted) of class-probability predictions."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)  # float32 softmax rows sum to 1 ± eps
    num_labels = num_labels or probs.shape[1]
    classes = list(range(num_labels))
    preds = probs.argmax(axis=1)
    out: dict[str, Any] = {"n": int(len(labels)), "accuracy": float(skm.accuracy_score(labels, preds))}
    for avg in ("weighted", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, labels=classes, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    out["roc_auc"] = roc_auc(labels, probs)
    out["loss"] = float(skm.log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=classes))
    out["confusion_matrix"] = skm.confusion_matrix(labels, preds, labels=classes).tolist()
    return out


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary ROC-AUC on the positive class, or one-vs-rest macro over the classes present; None if undefined."""
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    # One-vs-rest over the classes present in the labels (sklearn needs every listed class to occur).
    sub = probs[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    if len(present) == 2:
        return float(skm.roc_auc_score(labels == present[1], sub[:, 1]))
    return float(skm.roc_auc_score(labels, sub, multi_class="ovr", average="macro", labels=present))


def per_class_report(labels: np.ndarray, preds: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class."""
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=list(range(len(names))), zero_division=0)
    return [{"label": n, "precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
            for n, pi, ri, fi, si in zip(names, p, r, f, s)]


def compute_metrics_from_preds(labels: np.ndarray, preds: np.ndarray, num_labels: int,
                               probs: np.ndarray | None = None) -> dict[str, Any]:
    """The metrics of :func:`compute_metrics` from hard predictions (class ids), plus ``invalid``: the number of
    predictions equal to -1 (a baseline whose answer named no label).

    An invalid prediction is never mapped to a class: it counts as wrong in accuracy and as a miss of its gold class in
    recall (precision of the classes is unaffected). When there are invalid predictions the confusion matrix gets one
    extra final column, "invalid" (rows = gold, columns = predicted classes then invalid); without any it is the usual
    square matrix. ``roc_auc`` and ``loss`` need probabilities and are None without ``probs``."""
    labels = np.asarray(labels)
    preds = np.asarray(preds)
    classes = list(range(num_labels))
    n_invalid = int((preds == -1).sum())
    out: dict[str, Any] = {"n": int(len(labels)), "accuracy": float(skm.accuracy_score(labels, preds))}
    for avg in ("weighted", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, labels=classes, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
        out["roc_auc"] = roc_auc(labels, probs)
        out["loss"] = float(skm.log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=classes))
    else:
        out["roc_auc"], out["loss"] = None, None
    if n_invalid:
        matrix = skm.confusion_matrix(labels, preds, labels=classes + [-1])[:num_labels]  # drop the empty gold row
    else:
        matrix = skm.confusion_matrix(labels, preds, labels=classes)
    out["confusion_matrix"] = matrix.tolist()
    out["invalid"] = n_invalid
    return out

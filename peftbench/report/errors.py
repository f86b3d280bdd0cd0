"""Error analysis from the stored test predictions (``predictions.parquet``: id, text, label, pred, probs, length in
words; probs may be NaN for a method without probabilities; a sentence-pair dataset adds ``text_pair``, and its
``length`` counts the words of both texts).

Pure functions. An arm's predictions are ``{seed: frame}``; seeds are pooled (every seed's prediction of an example
counts once). A prediction of -1 (a baseline that named no label) is a mistake.

Example::

    >>> import pandas as pd
    >>> from peftbench.report.errors import error_by_length
    >>> p = pd.DataFrame({"id": [0, 1, 2, 3], "label": [0, 1, 0, 1], "pred": [1, 1, 0, 1], "length": [3, 30, 4, 40]})
    >>> error_by_length({"lora r=4": {0: p}}, buckets=2)["lora r=4"].tolist()
    [0.5, 0.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from peftbench.evaluate import per_class_report


def pooled(frames: dict[Any, pd.DataFrame]) -> pd.DataFrame:
    """All seeds' predictions of one arm stacked, with a ``seed`` and a ``correct`` column."""
    if not frames:
        return pd.DataFrame(columns=["id", "text", "label", "pred", "probs", "length", "seed", "correct"])
    out = pd.concat([f.assign(seed=seed) for seed, f in frames.items()], ignore_index=True)
    out["correct"] = out["pred"] == out["label"]
    return out


def recomputed_accuracy(frame: pd.DataFrame) -> float:
    """Accuracy of one run recomputed from its predictions (to check against result.json)."""
    return float(skm.accuracy_score(frame["label"], frame["pred"]))


def length_edges(lengths, buckets: int = 4) -> np.ndarray:
    """Bucket edges at the quantiles of the test texts' lengths (words; equal-count buckets, duplicates merged)."""
    lengths = pd.Series(lengths, dtype=float).dropna()
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, buckets + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0]]) if len(edges) else np.array([0.0, 0.0])
    return edges


def bucket_names(edges: np.ndarray) -> list[str]:
    names = []
    for i in range(len(edges) - 1):
        low = int(np.floor(edges[i])) if i == 0 else int(np.floor(edges[i])) + 1
        high = int(np.floor(edges[i + 1]))
        names.append(f"{low}–{high}" if high > low else f"{high}")
    return names


def error_by_length(arms: dict[str, dict[Any, pd.DataFrame]], buckets: int = 4) -> pd.DataFrame:
    """Error rate (fraction wrong, seeds pooled) per text-length bucket and arm. Buckets are quantiles of the test
    lengths (the same test set for every arm); ``n`` counts test examples per bucket."""
    frames = {arm: pooled(f) for arm, f in arms.items() if f}
    if not frames:
        return pd.DataFrame()
    first = next(iter(frames.values())).drop_duplicates("id")
    edges = length_edges(first["length"], buckets)
    names = bucket_names(edges)
    # include_lowest: the shortest text belongs to the first bucket; right-closed intervals otherwise.
    cut = lambda s: pd.cut(s, bins=edges, labels=names, include_lowest=True) if len(edges) > 2 else \
        pd.Categorical([names[0]] * len(s), categories=names)  # noqa: E731
    out = pd.DataFrame({"bucket": names})
    out["n"] = pd.Series(cut(first["length"])).value_counts().reindex(names).fillna(0).astype(int).to_numpy()
    for arm, p in frames.items():
        rate = (~p["correct"]).groupby(pd.Series(cut(p["length"]), index=p.index), observed=False).mean()
        out[arm] = rate.reindex(names).to_numpy()
    return out


def per_class(frames: dict[Any, pd.DataFrame], labels: list[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support of one arm, seeds pooled (support counts every seed)."""
    p = pooled(frames)
    if not len(p):
        return pd.DataFrame(columns=["label", "precision", "recall", "f1", "support"])
    names = list(labels) or [str(i) for i in range(int(max(p["label"].max(), p["pred"].max())) + 1)]
    return pd.DataFrame(per_class_report(p["label"].to_numpy(), p["pred"].to_numpy(), names))


def confusion(frames: dict[Any, pd.DataFrame], num_labels: int) -> np.ndarray:
    """Confusion matrix (rows = gold, columns = predicted) summed over seeds."""
    p = pooled(frames)
    return skm.confusion_matrix(p["label"], p["pred"], labels=list(range(num_labels)))


def _name(labels: list[str], i: Any) -> str:
    try:
        i = int(i)
    except (TypeError, ValueError):
        return str(i)
    if i == -1:
        return "(invalid)"
    return labels[i] if 0 <= i < len(labels) else str(i)


def _pair_column(frame: pd.DataFrame) -> list[str]:
    """``["text_pair"]`` for the predictions of a sentence-pair dataset, else ``[]``."""
    return ["text_pair"] if "text_pair" in frame.columns else []


def _confidence(probs: Any, pred: Any) -> float:
    if probs is None or pred is None or int(pred) < 0:
        return float("nan")
    probs = np.asarray(probs, dtype=float)
    return float(probs[int(pred)]) if 0 <= int(pred) < len(probs) else float("nan")


def confident_mistakes(frames: dict[Any, pd.DataFrame], labels: list[str], n: int = 10) -> pd.DataFrame:
    """The ``n`` mistakes made with the highest probability on the predicted class (seeds pooled, one row per example:
    its most confident mistake), with the text (and a sentence pair's ``text_pair``)."""
    p = pooled(frames)
    wrong = p[~p["correct"]].copy()
    cols = ["id", "seed", "text", *_pair_column(p), "gold", "predicted", "confidence", "length"]
    if not len(wrong):
        return pd.DataFrame(columns=cols)
    probs = wrong["probs"] if "probs" in wrong.columns else pd.Series([None] * len(wrong), index=wrong.index)
    wrong["confidence"] = [_confidence(pr, pd_) for pr, pd_ in zip(probs, wrong["pred"])]
    wrong["gold"] = [_name(labels, i) for i in wrong["label"]]
    wrong["predicted"] = [_name(labels, i) for i in wrong["pred"]]
    wrong = wrong.sort_values(["confidence", "id"], ascending=[False, True], na_position="last", kind="stable")
    wrong = wrong.drop_duplicates("id").head(n)
    for col in ("text", "length"):
        if col not in wrong.columns:
            wrong[col] = None
    return wrong[cols].reset_index(drop=True)


def disagreements(a: dict[Any, pd.DataFrame], b: dict[Any, pd.DataFrame], labels: list[str],
                  n: int = 10) -> tuple[dict[str, int], pd.DataFrame]:
    """Where two arms disagree on correctness. ``a_right_b_wrong`` counts examples right under arm A in most of its
    seeds and wrong under arm B in most of its seeds, ``b_right_a_wrong`` the reverse. The table lists up to ``n`` of
    each kind (A right first), most lopsided first: id, text (and text_pair), gold, and the fraction of seeds each
    arm got right."""
    pa, pb = pooled(a), pooled(b)
    if not len(pa) or not len(pb):
        return {"a_right_b_wrong": 0, "b_right_a_wrong": 0, "examples": 0}, pd.DataFrame()
    ra = pa.groupby("id")["correct"].mean().rename("a_right")
    rb = pb.groupby("id")["correct"].mean().rename("b_right")
    both = pd.concat([ra, rb], axis=1, join="inner")
    info = pa.drop_duplicates("id").set_index("id")
    both["text"] = info["text"].reindex(both.index) if "text" in info else None
    for col in _pair_column(info):
        both[col] = info[col].reindex(both.index)
    both["gold"] = [_name(labels, i) for i in info["label"].reindex(both.index)]
    a_wins = both[(both["a_right"] > 0.5) & (both["b_right"] < 0.5)]
    b_wins = both[(both["b_right"] > 0.5) & (both["a_right"] < 0.5)]
    counts = {"a_right_b_wrong": int(len(a_wins)), "b_right_a_wrong": int(len(b_wins)), "examples": int(len(both))}

    def top(frame: pd.DataFrame, who: str) -> pd.DataFrame:
        gap = (frame["a_right"] - frame["b_right"]).abs()
        return frame.assign(right_under=who, _gap=gap).sort_values(["_gap"], ascending=False, kind="stable").head(n)

    table = pd.concat([top(a_wins, "A"), top(b_wins, "B")]).drop(columns="_gap").reset_index()
    return counts, table[["id", "right_under", "text", *_pair_column(both), "gold", "a_right", "b_right"]]


# Above this many classes the report shows the top confusions as a table instead of the matrix, and per-class metrics
# as the worst classes (every class of every arm goes to per_class.csv).
MANY_CLASSES = 20


def per_class_arms(arms: dict[str, dict[Any, pd.DataFrame]], labels: list[str]) -> pd.DataFrame:
    """:func:`per_class` of every arm with predictions, stacked: ``arm``, ``label``, precision, recall, f1, support."""
    parts = [per_class(frames, labels).assign(arm=arm) for arm, frames in arms.items() if frames]
    cols = ["arm", "label", "precision", "recall", "f1", "support"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def worst_classes(per_class_long: pd.DataFrame, arm: str, n: int = 10) -> pd.DataFrame:
    """The ``n`` classes with the lowest F1 under ``arm`` (ties: more support first), with that arm's precision,
    recall and support and every arm's F1 as a column ``f1 <arm>``."""
    mine = per_class_long[per_class_long["arm"] == arm]
    worst = mine.sort_values(["f1", "support"], ascending=[True, False], kind="stable").head(n)
    f1 = per_class_long.pivot_table(index="label", columns="arm", values="f1", sort=False)
    out = worst[["label", "precision", "recall", "f1", "support"]].reset_index(drop=True)
    for other in dict.fromkeys(per_class_long["arm"]):
        out[f"f1 {other}"] = f1[other].reindex(out["label"]).to_numpy()
    return out


def top_confusions(matrix: np.ndarray, labels: list[str], n: int = 20) -> pd.DataFrame:
    """The ``n`` largest off-diagonal cells of a confusion matrix (rows = gold; a final extra column = invalid
    predictions): ``true``, ``predicted``, ``count`` and ``share`` = count / the true class's examples."""
    m = np.asarray(matrix)
    names = list(labels) + ["(invalid)"] * (m.shape[1] - len(labels))
    rows = [{"true": _name(labels, i), "predicted": names[j] if j < len(names) else str(j), "count": int(m[i, j]),
             "share": float(m[i, j] / m[i].sum())}
            for i in range(m.shape[0]) for j in range(m.shape[1]) if i != j and m[i, j] > 0]
    table = pd.DataFrame(rows, columns=["true", "predicted", "count", "share"])
    return table.sort_values(["count", "share"], ascending=False, kind="stable").head(n).reset_index(drop=True)


def out_of_scope(frames: dict[Any, pd.DataFrame], labels: list[str], oos_label: str) -> dict[str, Any] | None:
    """Larson et al. 2019 (CLINC150, "An evaluation dataset for intent classification and out-of-scope prediction",
    EMNLP) per seed, then mean and std over seeds: ``in_scope_accuracy`` = accuracy on the test examples whose gold
    class is not ``oos_label`` (predicting it counts as wrong), ``oos_recall`` = share of the ``oos_label`` examples
    predicted as it. None when ``oos_label`` is not one of ``labels`` or there are no predictions."""
    if oos_label not in labels or not frames:
        return None
    k = labels.index(oos_label)
    ins, rec = [], []
    for f in frames.values():
        gold, pred = f["label"].to_numpy(), f["pred"].to_numpy()
        inside = gold != k
        ins.append(float((pred[inside] == gold[inside]).mean()) if inside.any() else np.nan)
        rec.append(float((pred[~inside] == k).mean()) if (~inside).any() else np.nan)
    first = next(iter(frames.values()))["label"].to_numpy()

    def std(x):
        return float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")

    return {"in_scope_accuracy": float(np.mean(ins)), "in_scope_accuracy_std": std(ins),
            "oos_recall": float(np.mean(rec)), "oos_recall_std": std(rec), "seeds": len(frames),
            "n_in_scope": int((first != k).sum()), "n_oos": int((first == k).sum())}


def out_of_scope_table(arms: dict[str, dict[Any, pd.DataFrame]], labels: list[str], oos_label: str) -> pd.DataFrame:
    """:func:`out_of_scope` of every arm with predictions, one row each (empty when the label is unknown)."""
    rows = [{"arm": arm, **r} for arm, frames in arms.items() if (r := out_of_scope(frames, labels, oos_label))]
    return pd.DataFrame(rows, columns=["arm", "in_scope_accuracy", "in_scope_accuracy_std", "oos_recall",
                                       "oos_recall_std", "seeds", "n_in_scope", "n_oos"])

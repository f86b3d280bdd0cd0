"""Baseline arms that are not fine-tuned transformers: ``majority`` (always the training split's most frequent class,
scikit-learn's ``DummyClassifier``), ``tfidf`` (scikit-learn TF-IDF + logistic regression) and ``llm`` (a
chat-completions model asked zero- or few-shot, see :mod:`peftbench.llm`).

Each returns a :class:`BaselineResult` — hard predictions (and probabilities where the method has them), parameter
counts, costs and extra info — which the runner stores like any other run; metrics come from
``peftbench.evaluate.compute_metrics_from_preds``. Their parameters (and how an arm names them) are the methods'
(``peftbench.methods.baseline_arms``): the functions here take them resolved, defaults filled in.

Example::

    >>> import pandas as pd
    >>> from pathlib import Path
    >>> from peftbench.data import Splits
    >>> frame = pd.DataFrame({"text": ["good", "bad", "good fun", "bad plot"] * 5, "label": [1, 0, 1, 0] * 5})
    >>> splits = Splits(train=frame, validation=frame, test=frame, labels=["neg", "pos"])
    >>> from peftbench.methods import run_baseline
    >>> out = run_baseline("tfidf", {}, splits, seed=0, cache_dir=Path("/tmp"))
    >>> out.preds[:4].tolist(), out.params["trainable"]
    ([1, 0, 1, 0], 7)
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # data imports config, which imports methods: keep this module free of import cycles
    from peftbench.data import Splits


@dataclass
class BaselineResult:
    """What a baseline arm produced. Predictions are class ids; ``-1`` marks an LLM reply that named no label."""

    preds: np.ndarray                # test predictions, one per entry of test_ids
    probs: np.ndarray | None         # (n, n_labels) test probabilities (tfidf), else None
    val_preds: np.ndarray | None     # same for the validation split (llm: None, to save cost)
    val_probs: np.ndarray | None
    params: dict[str, Any]           # same keys as methods.count_parameters (None where meaningless)
    costs: dict[str, Any]            # train_time_s, eval_time_s, eval_examples_per_s, and for llm usage and cost
    info: dict[str, Any]             # JSON-ready extras: prompt, few-shot ids, invalid ids, vocabulary size, ...
    test_ids: np.ndarray | None = None  # positions in splits.test that preds refer to (None = all, in order)


# --------------------------------------------------------------------------------------------------------------------
# Majority class
# --------------------------------------------------------------------------------------------------------------------


def run_majority(splits: Splits) -> BaselineResult:
    """Always predict the training split's most frequent class (ties: the lowest id), with the training class shares
    as probabilities (``DummyClassifier(strategy="prior")``): the floor every trained arm must clear."""
    from sklearn.dummy import DummyClassifier

    n_labels = len(splits.labels)
    start = time.perf_counter()
    dummy = DummyClassifier(strategy="prior").fit(np.zeros((len(splits.train), 1)), splits.train["label"].to_numpy())
    train_time = time.perf_counter() - start

    def probs(n: int) -> np.ndarray:
        out = np.zeros((n, n_labels))
        out[:, dummy.classes_] = dummy.predict_proba(np.zeros((n, 1)))
        return out

    val_probs, test_probs = probs(len(splits.validation)), probs(len(splits.test))
    n_train = len(splits.train)
    return BaselineResult(
        preds=test_probs.argmax(1), probs=test_probs, val_preds=val_probs.argmax(1), val_probs=val_probs,
        params={"base_model": 0, "total": 0, "trainable": 0, "adapter": 0, "head": 0, "encoder_trainable": 0,
                "trainable_pct": None},
        costs={"train_time_s": train_time, "train_examples": n_train, "train_examples_per_s": None,
               "eval_time_s": 0.0, "eval_examples_per_s": None, "model_size_bytes": 0},
        info={"majority_class": splits.labels[int(test_probs[0].argmax())] if len(test_probs) else None,
              "class_prior": dummy.class_prior_.tolist()})


# --------------------------------------------------------------------------------------------------------------------
# TF-IDF + logistic regression
# --------------------------------------------------------------------------------------------------------------------


# A sentence pair reaches TF-IDF as one document: text, this separator, text_pair. It is one token of the default
# token pattern and in no real text, so the n-grams that span the boundary are told apart from those within a text.
PAIR_SEPARATOR = "__sep__"


def documents(frame) -> list[str]:
    """The TF-IDF documents of a split: its texts, or each text and its pair joined by ``PAIR_SEPARATOR``."""
    if "text_pair" not in frame.columns:
        return frame["text"].tolist()
    return (frame["text"] + f" {PAIR_SEPARATOR} " + frame["text_pair"]).tolist()


def _full_probs(pipeline, texts: list[str], n_labels: int) -> np.ndarray:
    """predict_proba with one column per label (a label absent from train gets probability 0)."""
    probs = np.zeros((len(texts), n_labels))
    probs[:, pipeline.classes_] = pipeline.predict_proba(texts)
    return probs


def run_tfidf(params: dict[str, Any], splits: Splits, seed: int) -> BaselineResult:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    vectorizer = TfidfVectorizer(max_features=params["max_features"], ngram_range=(1, params["ngram_max"]),
                                 min_df=params["min_df"], sublinear_tf=params["sublinear_tf"])
    classifier = LogisticRegression(C=params["C"], max_iter=1000, random_state=seed)
    pipeline = make_pipeline(vectorizer, classifier)
    n_labels = len(splits.labels)
    start = time.perf_counter()
    pipeline.fit(documents(splits.train), splits.train["label"].to_numpy())
    train_time = time.perf_counter() - start

    start = time.perf_counter()
    val_probs = _full_probs(pipeline, documents(splits.validation), n_labels)
    test_probs = _full_probs(pipeline, documents(splits.test), n_labels)
    eval_time = time.perf_counter() - start

    n_coef = int(classifier.coef_.size + classifier.intercept_.size)
    n_train, n_eval = len(splits.train), len(splits.validation) + len(splits.test)
    return BaselineResult(
        preds=test_probs.argmax(1), probs=test_probs, val_preds=val_probs.argmax(1), val_probs=val_probs,
        params={"base_model": 0, "total": n_coef, "trainable": n_coef, "adapter": 0, "head": 0,
                "encoder_trainable": 0, "trainable_pct": None},
        costs={"train_time_s": train_time, "train_examples": n_train,
               "train_examples_per_s": n_train / train_time if train_time else None,
               "eval_time_s": eval_time, "eval_examples_per_s": n_eval / eval_time if eval_time else None,
               "model_size_bytes": len(pickle.dumps(pipeline))},
        info={"vocabulary_size": len(vectorizer.vocabulary_), "n_coefficients": n_coef,
              "solver": classifier.solver})


# --------------------------------------------------------------------------------------------------------------------
# LLM zero-/few-shot
# --------------------------------------------------------------------------------------------------------------------


def subsample_test(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Sorted positions of a stratified subsample of ``n`` test examples, with a fixed seed (0) so that every seed
    and every llm arm classify the same texts (and a zero-shot repeat is served from the cache)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    stratify = labels if np.bincount(labels).min(initial=len(labels)) >= 2 and n >= len(np.unique(labels)) else None
    keep, _ = train_test_split(np.arange(len(labels)), train_size=n, random_state=0, stratify=stratify)
    return np.sort(keep)


def _llm_costs(usage, params: dict[str, Any], eval_time: float, n_texts: int) -> dict[str, Any]:
    """Time, request and token counts of an llm arm, with their price (``estimated``: as a fresh run would pay,
    ``spent``: only the replies fetched now, not served from the cache)."""

    def cost(prompt: int, completion: int) -> float:
        return prompt / 1000 * params["price_per_1k_input"] + completion / 1000 * params["price_per_1k_output"]

    return {"train_time_s": 0.0, "eval_time_s": eval_time,
            "eval_examples_per_s": n_texts / eval_time if eval_time else None, "eval_examples": n_texts,
            **usage.as_dict(), "estimated_cost_usd": cost(usage.prompt_tokens, usage.completion_tokens),
            "spent_cost_usd": cost(usage.new_prompt_tokens, usage.new_completion_tokens)}


def llm_items(frame) -> list:
    """What the llm arm classifies per row: the text, or the (text, text_pair) pair."""
    if "text_pair" not in frame.columns:
        return frame["text"].tolist()
    return list(zip(frame["text"], frame["text_pair"]))


def run_llm(params: dict[str, Any], splits: Splits, seed: int, cache_dir: Path) -> BaselineResult:
    from peftbench import llm

    settings = llm.LLMSettings.from_params(params)
    test_ids = subsample_test(splits.test["label"].to_numpy(), params["max_test"])
    shots, shot_ids = llm.pick_shots(llm_items(splits.train), splits.train["label"].tolist(), splits.labels,
                                     params["shots"], seed, settings.truncate, settings.truncate_side)
    texts = [llm_items(splits.test)[i] for i in test_ids]
    parts = splits.part_names if "text_pair" in splits.test.columns else None
    start = time.perf_counter()
    try:
        out = llm.classify(texts, splits.labels, settings, cache_dir, shots, parts)
    except llm.LLMError as e:  # the tokens spent before the failure are a cost of the (failed) run
        if getattr(e, "usage", None) is not None:
            e.costs = _llm_costs(e.usage, params, time.perf_counter() - start, len(texts))
        raise
    eval_time = time.perf_counter() - start
    invalid = np.flatnonzero(out.preds == llm.INVALID)
    return BaselineResult(
        preds=out.preds, probs=None, val_preds=None, val_probs=None,
        params={k: None for k in ("base_model", "total", "trainable", "adapter", "head", "encoder_trainable",
                                  "trainable_pct")},
        costs={**_llm_costs(out.usage, params, eval_time, len(texts)), "invalid": int(len(invalid))},
        info={"system_prompt": out.system_prompt,
              "user_template": llm.user_message(
                  [("<text 1>", "<text pair 1>"), ("<text 2>", "<text pair 2>")] if parts else ["<text 1>", "<text 2>"],
                  parts),
              "shot_train_ids": shot_ids, "invalid_test_ids": test_ids[invalid].tolist(),
              "invalid_replies": [out.replies[i][:300] for i in invalid[:20]],
              "n_classified": len(texts), "test_subsampled": bool(len(texts) < len(splits.test))},
        test_ids=test_ids)

"""Baseline arms that are not fine-tuned transformers: ``majority`` (always the training split's most frequent class,
scikit-learn's ``DummyClassifier``), ``tfidf`` (scikit-learn TF-IDF + logistic regression) and ``llm`` (a
chat-completions model asked zero- or few-shot, see :mod:`peftbench.llm`).

Both return a :class:`BaselineResult` — hard predictions (and probabilities where the method has them), parameter
counts, costs and extra info — which the runner stores like any other run; metrics come from
``peftbench.evaluate.compute_metrics_from_preds``.

Example::

    >>> import pandas as pd
    >>> from pathlib import Path
    >>> from peftbench.data import Splits
    >>> frame = pd.DataFrame({"text": ["good", "bad", "good fun", "bad plot"] * 5, "label": [1, 0, 1, 0] * 5})
    >>> splits = Splits(train=frame, validation=frame, test=frame, labels=["neg", "pos"])
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

# name → (kind, default, one-line doc); kinds as in peftbench.config.TRAIN_FIELDS.
TFIDF_PARAMS: dict[str, tuple[Any, Any, str]] = {
    "max_features": (int, 50000, "vocabulary size: keep the most frequent n-grams of the training split"),
    "ngram_max": (int, 2, "longest word n-gram (1 = unigrams, 2 = unigrams and bigrams)"),
    "min_df": (int, 1, "ignore n-grams found in fewer training texts than this"),
    "sublinear_tf": (bool, True, "use 1 + log(tf) instead of the raw term count"),
    "C": (float, 1.0, "inverse L2 regularisation strength of the logistic regression"),
}

LLM_PARAMS: dict[str, tuple[Any, Any, str]] = {
    "base_url": (str, "http://localhost:8000/v1",
                 "OpenAI-compatible endpoint; requests go to {base_url}/chat/completions"),
    "model": (str, "", "model name the endpoint serves (gpt-4o-mini, llama3.1:8b, Qwen/Qwen2.5-7B-Instruct, ...)"),
    "api_key_env": (str, "OPENAI_API_KEY", "environment variable holding the API key (unset: no Authorization header)"),
    "shots": (int, 0, "examples per class shown before the texts, drawn from train with the seed (0 = zero-shot)"),
    "batch_size": (int, 10, "texts per request, numbered; the reply must give one numbered label per text"),
    "truncate": (int, 500, "characters of each text kept (0 = whole text; a sentence pair: of each of its texts)"),
    "truncate_side": (str, "last", "which characters truncate keeps: first or last (reviews end with the verdict)"),
    "max_concurrency": (int, 4, "requests in flight at once"),
    "timeout_s": (float, 60.0, "seconds to wait for one reply before retrying"),
    "max_retries": (int, 4, "retries of a request after a 429, 5xx, timeout or connection error"),
    "retry_delay_s": (float, 1.0, "first backoff delay; doubles on every retry (a longer Retry-After wins)"),
    "price_per_1k_input": (float, 0.0, "USD per 1000 prompt tokens, for the estimated cost"),
    "price_per_1k_output": (float, 0.0, "USD per 1000 completion tokens, for the estimated cost"),
    "max_test": ("int?", None, "classify a stratified subsample of this many test texts (fixed across seeds)"),
}

BASELINE_PARAMS = {"majority": {}, "tfidf": TFIDF_PARAMS, "llm": LLM_PARAMS}
CHOICES = {"truncate_side": ("first", "last")}
MINIMUM = {"max_features": 1, "ngram_max": 1, "min_df": 1, "shots": 0, "batch_size": 1, "truncate": 0,
           "max_concurrency": 1, "max_retries": 0, "max_test": 1}
POSITIVE = ("C", "timeout_s")
NON_NEGATIVE = ("retry_delay_s", "price_per_1k_input", "price_per_1k_output")


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


def check_param(method: str, key: str, value: Any) -> Any:
    """Range and choice checks beyond the kind (raises ValueError with a message that does not name the field)."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"expected one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in MINIMUM and value is not None and value < MINIMUM[key]:
        raise ValueError(f"expected an integer >= {MINIMUM[key]}, got {value!r}")
    if key in POSITIVE and value <= 0:
        raise ValueError(f"expected a number > 0, got {value!r}")
    if key in NON_NEGATIVE and value < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    if method == "llm" and key == "model" and not value:
        raise ValueError("expected the model name the endpoint serves (e.g. gpt-4o-mini or llama3.1:8b)")
    return value


def resolve_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    spec = BASELINE_PARAMS[method]
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise ValueError(f"{method}: unknown setting {unknown[0]!r} (expected one of {', '.join(spec)})")
    return {k: params.get(k, default) for k, (_, default, _) in spec.items()}


def run_baseline(method: str, params: dict[str, Any], splits: Splits, seed: int, cache_dir: Path) -> BaselineResult:
    """Fit / query a baseline on ``splits`` and predict validation (tfidf) and test.

    ``cache_dir`` holds the LLM response cache (``cache_dir/llm/``); a re-run with the same settings sends nothing.
    """
    params = resolve_params(method, params)
    if method == "majority":
        return run_majority(splits)
    if method == "tfidf":
        return run_tfidf(params, splits, seed)
    if method == "llm":
        return run_llm(params, splits, seed, Path(cache_dir) / "llm")
    raise ValueError(f"unknown baseline method {method!r} (expected one of {', '.join(BASELINE_PARAMS)})")


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

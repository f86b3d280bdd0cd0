"""Baseline arms, no encoder to fine-tune: ``majority``, ``tfidf`` and ``llm``. Their work is done by
:mod:`peftbench.baselines` (and :mod:`peftbench.llm`); here are their parameters and their place in a study and a
report. They share the splits, metrics and store of every other run.

Example::

    >>> from peftbench.methods import METHODS
    >>> METHODS["tfidf"].baseline, METHODS["tfidf"].trains
    (True, False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftbench import baselines
from peftbench.fields import Field, by_name
from peftbench.llm import LLM_FIELDS
from peftbench.methods.base import Method


class Baseline(Method):
    """A method with no encoder: it runs through :meth:`run_baseline`; nothing about models applies."""

    trains = False
    baseline = True
    params_axis = False  # TF-IDF coefficients, an llm's nothing: not on the encoders' parameter scale

    def resolved_names(self, backbone, params):
        return {}


class Majority(Baseline):
    name = "majority"
    doc = "always the training split's most frequent class (the floor to clear)"
    params: dict[str, Field] = {}
    order = 0
    role = "floor"  # the report checks the untrained head against it

    def run_baseline(self, params: dict[str, Any], splits, seed: int, cache_dir: Path):
        return baselines.run_majority(splits)


class Tfidf(Baseline):
    name = "tfidf"
    doc = "TF-IDF + logistic regression (scikit-learn)"
    params = by_name(
        Field("max_features", int, 50000, "vocabulary size: keep the most frequent n-grams of the training split",
              minimum=1),
        Field("ngram_max", int, 2, "longest word n-gram (1 = unigrams, 2 = unigrams and bigrams)", minimum=1),
        Field("min_df", int, 1, "ignore n-grams found in fewer training texts than this", minimum=1),
        Field("sublinear_tf", bool, True, "use 1 + log(tf) instead of the raw term count"),
        Field("C", float, 1.0, "inverse L2 regularisation strength of the logistic regression", minimum=0,
              exclusive_minimum=True),
    )
    order = 1

    def run_baseline(self, params, splits, seed, cache_dir):
        return baselines.run_tfidf(params, splits, seed)


class Llm(Baseline):
    name = "llm"
    doc = "a chat-completions model asked zero- or few-shot"
    params = LLM_FIELDS
    label_keys = ("model", "shots")
    order = 2

    def run_baseline(self, params, splits, seed, cache_dir):
        """``cache_dir/llm/`` holds the response cache: a re-run with the same settings sends nothing."""
        return baselines.run_llm(params, splits, seed, Path(cache_dir) / "llm")

"""The verdict's statistics, checked by simulation on fake prediction tables (no training; seconds).

- calibration: at a true Δ = −margin the false "non-inferior" rate is ≤ 2.5% within Monte-Carlo error (≤ 4% over
  2,000 simulated studies) on the grid seeds ∈ {3, 5, 10} × test examples ∈ {500, 5,000} × seed std ∈ {0.5, 2};
- the same with sequential looks (``--until-decided``) and alpha spending;
- the per-example linearisation of F1 equals scikit-learn's value and the bootstrap's variance;
- Holm, the spending function, the expected-max estimator and the planning numbers on known cases.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from peftbench import simulation
from peftbench.report import tables, verdict

STUDIES = 2000


def class_counts(labels: np.ndarray, preds: np.ndarray, idx: np.ndarray, num_labels: int) -> tuple[np.ndarray, ...]:
    """Per-class true positives, predicted and gold counts, each (resamples, num_labels), of the example indices
    ``idx`` (resamples, n) — one ``np.bincount`` per count. A prediction of -1 (no label), or of an id >= num_labels,
    is never a class."""
    rows = np.arange(idx.shape[0])[:, None] * num_labels

    def count(values):
        v = values[idx]
        keep = (v >= 0) & (v < num_labels)
        return np.bincount((rows + v)[keep], minlength=idx.shape[0] * num_labels).reshape(idx.shape[0], num_labels)

    return count(np.where(labels == preds, labels, -1)), count(preds), count(labels)


def from_counts(tp: np.ndarray, predicted: np.ndarray, gold: np.ndarray, metric: str) -> np.ndarray:
    """Accuracy, or precision / recall / F1 averaged ``macro`` (every class counts, like peftbench.evaluate) or
    ``weighted`` (by gold support), from per-class counts; 0 where a class is undefined (scikit-learn's
    ``zero_division=0``): the bootstrap oracle below, vectorised over resamples."""
    tp, predicted, gold = (np.asarray(a, dtype=float) for a in (tp, predicted, gold))
    if metric == "accuracy":
        return tp.sum(-1) / gold.sum(-1)
    kind, avg = metric.rsplit("_", 1)
    denominator = {"precision": predicted, "recall": gold, "f1": (predicted + gold) / 2}[kind]
    per_class = np.divide(tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    if avg == "macro":
        return per_class.mean(-1)
    return (per_class * gold).sum(-1) / gold.sum(-1)


@pytest.mark.parametrize("seeds, n, seed_std", simulation.GRID)
def test_false_non_inferior_rate_at_the_margin(seeds, n, seed_std):
    rates = simulation.rates(-1.0, seeds, n, seed_std, STUDIES, seed=1)
    rate = simulation.false_noninferior(rates)
    assert rate <= 0.04, f"false non-inferior rate {rate:.3%} at seeds={seeds}, n={n}, seed std={seed_std}"


def test_sequential_looks_keep_the_false_non_inferior_rate():
    """Looks at 3, 5, 7, 9, 11 seeds, each at its spent level: the overall rate stays ≤ 2.5% (MC error: ≤ 4%),
    whereas testing every look at the full 2.5% would not be guaranteed to."""
    for n, std in [(5000, 0.5), (500, 2.0)]:
        rates = simulation.sequential_rates(-1.0, 3, 2, 11, n, std, STUDIES, seed=4)
        assert simulation.false_noninferior(rates) <= 0.04
    assert sum(verdict.look_levels(verdict.look_schedule(3, 2, 11))) == pytest.approx(verdict.ALPHA)


def test_power_grows_with_seeds_when_seeds_are_the_bottleneck():
    low = simulation.false_noninferior(simulation.rates(0.0, 3, 5000, 0.5, 400, seed=2))
    high = simulation.false_noninferior(simulation.rates(0.0, 10, 5000, 0.5, 400, seed=2))
    assert high > low + 0.3


def test_arm_interval_covers_the_true_accuracy():
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(400):
        table = simulation.simulate_arm(rng, rng.random(1000), 0.8, 3, 0.01)
        ci = verdict.mean_interval(table)
        hits += ci["low"] <= 0.8 <= ci["high"]
    assert 0.92 <= hits / 400 <= 0.99


@pytest.mark.parametrize("metric", ["accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_weighted",
                                    "precision_weighted", "recall_macro"])
def test_influence_mean_is_the_metric_and_its_variance_the_bootstraps(metric):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=3000)
    preds = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, 4, size=3000))
    psi = verdict.influence(labels, preds, metric, 4)
    kind, _, avg = metric.partition("_")
    expected = (labels == preds).mean() if metric == "accuracy" else {
        "f1": f1_score, "precision": precision_score, "recall": recall_score}[kind](
        labels, preds, labels=list(range(4)), average=avg, zero_division=0)
    assert psi.mean() == pytest.approx(expected, abs=1e-12)
    assert from_counts(*class_counts(labels, preds, np.arange(3000)[None, :], 4), metric)[0] == pytest.approx(
        expected, abs=1e-12)  # the bootstrap oracle below is right too
    idx = rng.integers(0, 3000, size=(1000, 3000))
    boot = from_counts(*class_counts(labels, preds, idx, 4), metric)
    assert psi.var(ddof=1) / 3000 == pytest.approx(boot.var(ddof=1), rel=0.15)


def test_holm_step_down():
    assert verdict.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(verdict.holm([0.01, float("nan")])[1])


def test_spending_levels():
    schedule = verdict.look_schedule(3, 2, 10)
    assert schedule == [3, 5, 7, 9, 10]
    levels = verdict.look_levels(schedule)
    assert all(lv > 0 for lv in levels) and sum(levels) == pytest.approx(0.025)
    assert verdict.look_levels([5]) == pytest.approx([0.025])  # one look: the full level


def test_expected_max_equals_the_average_over_subsets():
    values = [0.81, 0.78, 0.84, 0.80, 0.79]
    curve = tables.expected_max(values)
    for n, got in enumerate(curve, 1):
        brute = np.mean([max(c) for c in itertools.combinations(values, n)])
        assert got == pytest.approx(brute)
    assert tables.expected_max([0.5, 0.3], higher=False) == pytest.approx([0.4, 0.3])


def test_plan_says_when_more_seeds_cannot_help():
    """Two arms right on unrelated examples (independent difficulties): the paired difference varies a lot from
    example to example, so 300 test examples cannot pin Δ down to a 1-point margin however many seeds."""
    rng = np.random.default_rng(5)
    ref = simulation.simulate_arm(rng, rng.random(300), 0.85, 3, 0.0005)
    cand = simulation.simulate_arm(rng, rng.random(300), 0.85, 3, 0.0005)
    d = verdict.difference(cand, ref)
    plan = verdict.plan(d, margin=0.01)
    assert plan["seeds_needed"] is None  # the test set is the limit
    assert "more seeds cannot decide at this test-set size" in plan["bottleneck"]
    assert plan["test_examples_needed"] is None or plan["test_examples_needed"] > 300


def test_plan_asks_for_seeds_when_seeds_dominate():
    rng = np.random.default_rng(6)
    u = rng.random(20000)
    ref = simulation.simulate_arm(rng, u, 0.85, 3, 0.02)
    cand = simulation.simulate_arm(rng, u, 0.85, 3, 0.02)
    plan = verdict.plan(verdict.difference(cand, ref), margin=0.01)
    assert plan["seeds_needed"] is not None and plan["seeds_needed"] > 3

"""Simulated studies for checking the verdict's error rates (no training): fake per-example correctness tables.

Generative model of one arm's test results (accuracy): every test example ``i`` has a difficulty ``u_i ~ U(0, 1)``
shared by all arms and seeds (so two arms' mistakes are correlated, as they are on a real test set); every training
seed ``j`` has a skill ``s_j ~ N(p, σ_seed²)``; the run is right on example ``i`` when ``(u_i + ε_ij) mod 1 < s_j``,
with ``ε_ij ~ U(−w, w)`` the run-to-run churn on one example. ``(u + ε) mod 1`` is uniform, so a seed's expected
accuracy is exactly ``s_j`` and the arm's true accuracy (over test populations and seeds) exactly ``p``: the true
Δ between two arms is known, which is what an error-rate check needs.

``python -m peftbench.simulation`` prints the calibration and power tables of docs/report.md.

Example::

    >>> from peftbench.simulation import simulate_arm
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u = rng.random(5000)
    >>> table = simulate_arm(rng, u, p=0.8, seeds=3, seed_std=0.01)
    >>> table.shape, abs(table.mean() - 0.8) < 0.03
    ((5000, 3), True)
"""

from __future__ import annotations

import argparse
import numpy as np
from scipy import stats

from peftbench.report import verdict

CHURN = 0.15  # w: about 10% of examples change outcome between two seeds of one arm


def simulate_arm(rng: np.random.Generator, u: np.ndarray, p: float, seeds: int, seed_std: float,
                 churn: float = CHURN) -> np.ndarray:
    """(…, n, seeds) table of 0/1 correctness of one arm on the examples of difficulty ``u`` (…, n) (see the module
    doc); leading axes of ``u`` are a batch of independent studies."""
    u = np.asarray(u, dtype=np.float32)
    skill = (p + seed_std * rng.standard_normal(u.shape[:-1] + (1, seeds))).astype(np.float32)
    eps = rng.random(u.shape + (seeds,), dtype=np.float32)
    eps *= 2 * churn
    eps += u[..., None] - churn
    return (np.mod(eps, 1.0) < skill).astype(np.float32)


def decide(cand: np.ndarray, ref: np.ndarray, margin: float, alpha: float = verdict.ALPHA) -> np.ndarray:
    """The verdicts of candidates against their references (fractions; one candidate per study, so Holm changes
    nothing), for a batch of (…, n, k) tables: an array of verdict strings."""
    d = verdict.difference(cand, ref)
    p = verdict.one_sided_p(d["diff"], d["se"], d["df"], margin)
    ni, sup, inf = (np.asarray(p[k]) <= alpha for k in ("p_noninferior", "p_superior", "p_inferior"))
    return np.where(ni, np.where(sup, verdict.SUPERIOR, verdict.NON_INFERIOR),
                    np.where(inf, verdict.INFERIOR, verdict.UNDECIDED))


def _batches(studies: int, n: int, seeds: int) -> list[int]:
    per = max(1, int(4e6 // (n * seeds)))  # about 16 MB per float32 table
    return [min(per, studies - i) for i in range(0, studies, per)]


def _shares(outcomes: np.ndarray) -> dict[str, float]:
    return {k: float(np.mean(outcomes == k)) for k in verdict.DECIDED + (verdict.UNDECIDED,)}


def rates(true_diff_points: float, seeds: int, n: int, seed_std_points: float, studies: int = 2000,
          margin_points: float = 1.0, base: float = 0.85, seed: int = 0) -> dict[str, float]:
    """Share of ``studies`` simulated studies ending in each verdict, one candidate vs the reference, fixed seeds."""
    rng = np.random.default_rng(seed)
    outcomes = []
    for size in _batches(studies, n, seeds):
        u = rng.random((size, n), dtype=np.float32)
        ref = simulate_arm(rng, u, base, seeds, seed_std_points / 100)
        cand = simulate_arm(rng, u, base + true_diff_points / 100, seeds, seed_std_points / 100)
        outcomes.append(np.atleast_1d(decide(cand, ref, margin_points / 100)))
    return _shares(np.concatenate(outcomes))


def sequential_rates(true_diff_points: float, first: int, step: int, max_seeds: int, n: int, seed_std_points: float,
                     studies: int = 2000, margin_points: float = 1.0, base: float = 0.85,
                     seed: int = 0) -> dict[str, float]:
    """As :func:`rates`, but with looks at ``first``, ``first + step``, … ``max_seeds`` seeds, each at the level
    of :func:`peftbench.report.verdict.look_levels`, stopping at the first decision (``--until-decided``). Adds
    ``mean_seeds``, the average number of seeds per arm spent."""
    rng = np.random.default_rng(seed)
    schedule = verdict.look_schedule(first, step, max_seeds)
    levels = verdict.look_levels(schedule)
    outcomes, spent = [], []
    for size in _batches(studies, n, max_seeds):
        u = rng.random((size, n), dtype=np.float32)
        ref = simulate_arm(rng, u, base, max_seeds, seed_std_points / 100)
        cand = simulate_arm(rng, u, base + true_diff_points / 100, max_seeds, seed_std_points / 100)
        final = np.full(size, verdict.UNDECIDED, dtype=object)
        used = np.full(size, schedule[-1])
        open_ = np.ones(size, dtype=bool)
        for k, level in zip(schedule, levels):
            now = np.atleast_1d(decide(cand[..., :k], ref[..., :k], margin_points / 100, level))
            stop = open_ & (now != verdict.UNDECIDED)
            final[stop], used[stop] = now[stop], k
            open_ &= ~stop
        outcomes.append(final)
        spent.append(used)
    return {**_shares(np.concatenate(outcomes)), "mean_seeds": float(np.concatenate(spent).mean())}


def false_noninferior(r: dict[str, float]) -> float:
    """A non-inferiority claim (superior included) when the truth is Δ = −margin."""
    return r[verdict.NON_INFERIOR] + r[verdict.SUPERIOR]


def monte_carlo_bound(rate: float, studies: int) -> float:
    """Upper end of the exact (Clopper–Pearson) 95% interval of a simulated rate."""
    k = round(rate * studies)
    return 1.0 if k >= studies else float(stats.beta.ppf(0.975, k + 1, studies - k))


GRID = [(seeds, n, std) for seeds in (3, 5, 10) for n in (500, 5000) for std in (0.5, 2.0)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="calibration and power of the verdict by simulation")
    parser.add_argument("--studies", type=int, default=2000)
    args = parser.parse_args(argv)
    print("| seeds | test examples | seed std (points) | false non-inferior at Δ = −1 | power at Δ = 0 "
          "(non-inferior) | inferior at Δ = −3 |")
    print("|---|---|---|---|---|---|")
    for seeds, n, std in GRID:
        null = rates(-1.0, seeds, n, std, args.studies, seed=1)
        alt = rates(0.0, seeds, n, std, args.studies, seed=2)
        bad = rates(-3.0, seeds, n, std, args.studies, seed=3)
        print(f"| {seeds} | {n:,} | {std:g} | {100 * false_noninferior(null):.2f}% | "
              f"{100 * false_noninferior(alt):.1f}% | {100 * bad[verdict.INFERIOR]:.1f}% |")
    print()
    print("| test examples | seed std | looks (seeds) | false non-inferior at Δ = −1 | power at Δ = 0 | "
          "mean seeds spent at Δ = 0 |")
    print("|---|---|---|---|---|---|")
    for n, std in [(500, 0.5), (5000, 0.5), (5000, 2.0)]:
        null = sequential_rates(-1.0, 3, 2, 11, n, std, args.studies, seed=4)
        alt = sequential_rates(0.0, 3, 2, 11, n, std, args.studies, seed=5)
        looks = ", ".join(map(str, verdict.look_schedule(3, 2, 11)))
        print(f"| {n:,} | {std:g} | {looks} | {100 * false_noninferior(null):.2f}% | "
              f"{100 * false_noninferior(alt):.1f}% | {alt['mean_seeds']:.1f} |")


if __name__ == "__main__":
    main()

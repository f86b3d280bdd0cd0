"""Adaptive seeds: ``peftbench run STUDY --until-decided --max-seeds N``.

The study runs with its own seeds; then, look after look, the arms whose verdict is still *undecided* — and their
reference — get the next unused seeds, the verdicts are re-analysed, and this repeats until every verdict is decided
or every arm has ``max_seeds`` seeds. Looks are planned in advance: ``k₁ = len(seeds)``, then ``+ seed_step`` seeds
per look up to ``max_seeds`` (:func:`peftbench.report.verdict.look_schedule`). Repeated looks would inflate the error
rate if each used the full α, so look ℓ tests at the level spent by a Pocock-type Lan–DeMets function between looks
ℓ − 1 and ℓ (:func:`peftbench.report.verdict.look_levels`): the levels add up to α, so the overall false
"non-inferior" rate stays ≤ α (union bound), and an arm decided at a look keeps that verdict.

The added runs are ordinary stored runs (content-addressed, resumable, listed by ``peftbench ls``); the record of the
looks — seeds, levels, decisions, run ids — is ``STORE/.sequential/<study>.json``, written through the store, and is
what ``peftbench report STUDY`` uses to show the same verdicts later. A re-run of the same command resumes: finished
runs are skipped and the looks are replayed from the store.

Example::

    >>> from peftbench.config import load_study
    >>> from peftbench.sequential import run_until_decided
    >>> record = run_until_decided(load_study("studies/demo.toml"), "runs", execute=..., max_seeds=6)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from peftbench.config import ConfigError, RunConfig, Study, check_reference, expand_runs
from peftbench.report import sequential_key, study_analysis, verdict
from peftbench.store import Store


def check(study: Study, max_seeds: int | None, seed_step: int) -> int:
    """Validate the ``--until-decided`` settings before anything runs; returns the seed budget per arm."""
    first = len(study.seeds)
    budget = max_seeds if max_seeds is not None else 2 * first + 4
    if budget < 1:
        raise ConfigError(f"--max-seeds: expected an integer >= 1, got {budget}")
    if budget < max(first, 2):
        raise ConfigError(f"--max-seeds: expected at least the study's {first} seed(s) (and >= 2, a verdict needs 2 "
                          f"seeds per arm), got {budget}")
    if seed_step < 1:
        raise ConfigError(f"--seed-step: expected an integer >= 1, got {seed_step}")
    # the default reference ("full") is not checked when the study loads: a study without it may still be reported
    check_reference(f"{study.path or 'study'}: report.reference (--until-decided needs a reference arm)", study)
    return budget


def with_seeds(study: Study, seeds: list[int]) -> Study:
    """The same study with other seeds."""
    out = copy.copy(study)
    out.seeds = list(seeds)
    return out


def _targets(rows: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(model, dataset, arm) of the open comparisons and of their references."""
    out = set()
    for r in rows:
        out.add((r["model"], r["dataset"], r["arm"]))
        out.add((r["model"], r["dataset"], r["reference"]))
    return out


def run_until_decided(study: Study, store: str | Path, execute: Callable[[list[RunConfig] | None], Any],
                      max_seeds: int | None = None, seed_step: int = 2, say: Callable[[str], None] = tqdm.write
                      ) -> dict[str, Any]:
    """Run ``study``, then add seeds to undecided arms look by look (see the module doc). ``execute(runs)`` runs
    the given runs of the study (None: all of them) with the chosen executor. Returns the sequential record."""
    budget = check(study, max_seeds, seed_step)
    store_obj = Store(store)
    schedule = verdict.look_schedule(len(study.seeds), seed_step, budget)
    levels = verdict.look_levels(schedule)
    record: dict[str, Any] = {"study": study.name, "alpha": verdict.ALPHA, "schedule": schedule, "levels": levels,
                              "seed_step": seed_step, "max_seeds": budget, "looks": [], "decided": {},
                              "run_ids": [r.run_id for r in expand_runs(study)]}
    execute(None)
    used = sorted(study.seeds)
    for look, (k, level) in enumerate(zip(schedule, levels), 1):
        record["looks"].append({"look": look, "seeds": k, "alpha": level})
        analysis = study_analysis(store_obj.root, record["run_ids"], study, record)
        rows = analysis["verdicts"].to_dict("records") if len(analysis["verdicts"]) else []
        now_open = []
        for r in rows:
            key = sequential_key(r["model"], r["dataset"], r["arm"])
            if key in record["decided"]:
                continue
            if r["verdict"] in verdict.DECIDED:
                record["decided"][key] = {**{k2: v for k2, v in r.items() if not k2.startswith("_")},
                                          "look": look}
            elif r["verdict"] == verdict.UNDECIDED:
                now_open.append(r)
        record["looks"][-1].update(open=[r["arm"] for r in now_open],
                                   decided=[r["arm"] for r in rows if r["verdict"] in verdict.DECIDED])
        store_obj.write_sequential(study.name, record)
        say(f"look {look}/{len(schedule)} ({k} seeds per arm, one-sided level {level:.4f}): "
            f"{len(record['decided'])} decided, {len(now_open)} undecided"
            + (f" ({', '.join(r['arm'] for r in now_open)})" if now_open else ""))
        if not now_open or look == len(schedule):
            break
        new = list(range(max(used) + 1, max(used) + 1 + schedule[look] - k))
        used += new
        wanted = _targets(now_open)
        runs = [r for r in expand_runs(with_seeds(study, new)) if (r.model, r.dataset["name"], r.arm) in wanted]
        record["run_ids"] += [r.run_id for r in runs]
        store_obj.write_sequential(study.name, record)
        say(f"adding seeds {', '.join(map(str, new))} to {len({r.arm for r in runs})} arm(s): {len(runs)} runs")
        execute(runs)
    return record

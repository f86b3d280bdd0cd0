"""Hyperparameter search through Optuna: a study's ``search`` table and train settings given as range tables.

::

    search = { sampler = "tpe", trials = 8 }

    [train]
    lr = { low = 1e-5, high = 1e-3, log = true }
    warmup_ratio = { low = 0.0, high = 0.2 }
    batch_size = { choices = [16, 32] }

A *searched arm* is one arm label (a grid point of the method parameters) of one model × dataset whose train settings
hold a range; it gets its own Optuna study, and every searched arm gets the same ``trials`` (a fair comparison).
A trial is an ordinary run: the arm's config with the sampled values on the study's **first seed**, content-addressed,
stored and resumable like any other (two trials that sample the same values are one run). Its value is the run's
validation score on ``report.selection_metric``; test scores play no part. When an arm's trials are done, its best
trial's setting (ties: the earlier trial) runs on **every** seed of the study, and those runs — not the other
trials — are the arm's runs in the report and verdict, so the report's per-arm selection sees one setting per
searched arm and the verdict compares arms at their searched settings with all their seeds.

Trials are asked and told through Optuna's ask/tell API, ``batch`` per arm at a time, all arms' batches run together
by the executor (``execute(runs)``: the local loop or Ray tasks). The Optuna studies live in the store,
``STORE/.search/<study>/<point>.journal`` (Optuna's JournalStorage, one file per searched arm, named by the hash of
its config without the seed, so changing a range or the epochs starts a new search); ``STORE/.search/<study>/
record.json`` lists every trial, its run id and value, each arm's choice and the report's run ids. A re-run resumes:
a trial asked but never told (an interrupted run) is run (or found in the store) and told, then the search asks only
for the trials still missing; with all done it runs nothing new. The sampler is re-seeded before each trial from
``search.seed`` and the trial's number, so an interrupted and resumed search proposes what an uninterrupted one
would. A trial whose run another runner holds stays open (neither failed nor re-asked) and its arm's best setting
waits for a later re-run. Sampled floats (without a ``step``) are rounded to 4 significant digits, so labels stay
readable.

Example::

    >>> from peftbench.config import load_study
    >>> from peftbench.search import run_search
    >>> record = run_search(load_study("studies/search.toml"), "runs")      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from peftbench import methods
from peftbench.config import ConfigError, RunConfig, Study, config_hash, expand_runs, is_range
from peftbench.report.tables import higher_is_better
from peftbench.store import Store, read_result

INSTALL = "pip install 'peftbench[optuna]'"


@dataclass
class Point:
    """One searched arm of one model × dataset: its first-seed run config with the range tables in ``train``."""

    key: str  # "model | dataset | arm", as the record names it
    template: RunConfig

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.template.train.items() if is_range(v)}

    @property
    def point_id(self) -> str:
        """Hash of the arm's config without the seed: the name of its Optuna study and journal file."""
        return config_hash({k: v for k, v in self.template.hashed.items() if k != "seed"})

    def trial_run(self, params: dict[str, Any], seed: int | None = None) -> RunConfig:
        """The run of a trial: the sampled values in place of the ranges (as expand_runs would write fixed values, so
        a trial is the same run, same id, as the grid run of those values)."""
        train = methods.METHODS[self.template.method].relevant_train({**self.template.train, **params},
                                                                   self.template.method_params)
        return dataclasses.replace(self.template, train=train,
                                   seed=self.template.seed if seed is None else seed)


def points(study: Study) -> list[Point]:
    """The study's searched arms, in expand_runs order."""
    out: dict[str, Point] = {}
    for run in expand_runs(study, searched=True):
        if run.seed == study.seeds[0] and any(map(is_range, run.train.values())):
            key = f"{run.model} | {run.dataset['name']} | {run.arm}"
            out.setdefault(key, Point(key, run))
    return list(out.values())


def check(study: Study, until_decided: bool = False) -> None:
    """Before anything runs: Optuna is installed (one-line ConfigError with the pip command) and the search is not
    combined with ``--until-decided``."""
    if not study.search:
        return
    if until_decided:
        raise ConfigError(f"{study.path or 'study'}: search: --until-decided does not run a study with a search "
                          f"(yet); run it without --until-decided")
    _optuna()


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"search: the study's search table needs Optuna: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def describe(study: Study) -> str:
    """One line for ``peftbench validate``: what the search will run."""
    s, found = study.search, points(study)
    keys = sorted({k for p in found for k in p.space})
    seeds = ", ".join(map(str, study.seeds))
    return (f"search: {s['sampler']}, {s['trials']} trials per arm on seed {study.seeds[0]} for {len(found)} "
            f"searched arm(s) ({', '.join(keys)}), then each arm's best setting on seeds {seeds}: up to "
            f"{len(found) * (s['trials'] + len(study.seeds) - 1)} more runs")


def _distribution(optuna, table: dict[str, Any]):
    d = optuna.distributions
    if "choices" in table:
        return d.CategoricalDistribution(table["choices"])
    if isinstance(table["low"], int) and isinstance(table["high"], int):
        return d.IntDistribution(table["low"], table["high"], log=table["log"], step=table.get("step", 1))
    return d.FloatDistribution(table["low"], table["high"], log=table["log"], step=table.get("step"))


def _readable(params: dict[str, Any], space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sampled floats without a step rounded to 4 significant digits (kept inside their range); with a step, to 12
    (0.15, not 0.15000000000000002)."""
    out = {}
    for key, value in params.items():
        table = space[key]
        if isinstance(value, float) and "choices" not in table:
            digits = 4 if table.get("step") is None else 12
            value = min(max(float(f"{value:.{digits}g}"), table["low"]), table["high"])
        out[key] = value
    return out


def _sampler(optuna, search: dict[str, Any], number: int):
    """The sampler proposing trial ``number``, seeded from the search seed and the trial number."""
    seed = (search["seed"] * 1_000_003 + number) % 2**32
    if search["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = {} if search["startup"] is None else {"n_startup_trials": search["startup"]}
    return optuna.samplers.TPESampler(seed=seed, **startup)


def _value(store: Store, run: RunConfig, metric: str) -> float | None:
    """The run's validation score on ``metric``; None when the run failed or has none."""
    result = read_result(store.run_dir(run.run_id)) or {}
    if result.get("status") != "success":
        return None
    value = ((result.get("metrics") or {}).get("validation") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_search(study: Study, store: str | Path | None = None,
               execute: Callable[[list[RunConfig]], Any] | None = None,
               say: Callable[[str], None] = tqdm.write) -> dict[str, Any]:
    """Run ``study``'s fixed runs, its search (see the module doc), then each searched arm's best setting on every
    seed. ``execute(runs)`` runs the given runs of the study (default: the local executor). Returns the record
    (also written to ``STORE/.search/<study>/record.json``); its ``run_ids`` are the study's runs for the report."""
    if not study.search:
        raise ConfigError(f"{study.path or 'study'}: no search table to run")
    optuna = _optuna()
    store_obj = Store(store or study.store)
    if execute is None:
        from peftbench.executors import run_study

        def execute(runs):
            return run_study(study, store_obj.root, runs=runs)

    s, metric = study.search, study.report["selection_metric"]
    direction = "maximize" if higher_is_better(metric) else "minimize"
    fixed = expand_runs(study)
    execute(fixed)
    folder = store_obj.search_dir(study.name)
    folder.mkdir(parents=True, exist_ok=True)
    searched = []
    for point in points(study):
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(folder / f"{point.point_id}.journal")))
        ostudy = optuna.create_study(storage=storage, study_name=point.point_id, direction=direction,
                                     load_if_exists=True)
        if ostudy.user_attrs.get("arm") != point.key:
            ostudy.set_user_attr("arm", point.key)
        searched.append((point, ostudy))
    dists = {id(p): {k: _distribution(optuna, t) for k, t in p.space.items()} for p, _ in searched}

    while True:
        batch = []  # (point, optuna study, trial number, run)
        for point, ostudy in searched:
            trials = ostudy.get_trials(deepcopy=False)
            open_ = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]  # asked, never told
            for number in range(len(trials), min(len(trials) + s["batch"] - len(open_), s["trials"])):
                ostudy.sampler = _sampler(optuna, s, number)
                open_.append(ostudy.ask(dists[id(point)]))
            batch += [(point, ostudy, t.number, point.trial_run(_readable(t.params, point.space))) for t in open_]
        if not batch:
            break
        finished = sum(t.state.is_finished() for _, o in searched for t in o.get_trials(deepcopy=False))
        say(f"search: {len(batch)} trial(s) of {len({p.key for p, *_ in batch})} arm(s) ({finished} of "
            f"{len(searched) * s['trials']} done)")
        execute(list({r.run_id: r for *_, r in batch}.values()))
        told = 0
        for point, ostudy, number, run in batch:
            if store_obj.status(run.run_id) is None:  # held by another runner: its trial stays open
                continue
            value = _value(store_obj, run, metric)
            told += 1
            if value is None:
                ostudy.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            else:
                ostudy.tell(number, value, skip_if_finished=True)
        if not told:
            say("search: the open trials' runs are held by another runner; re-run when it has finished them")
            break

    record: dict[str, Any] = {"study": study.name, "search": s, "metric": f"val_{metric}", "direction": direction,
                              "search_seed": study.seeds[0], "seeds": list(study.seeds), "arms": {},
                              "run_ids": [r.run_id for r in fixed]}
    finals = []
    for point, ostudy in searched:
        trials = ostudy.get_trials(deepcopy=False)[: s["trials"]]
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        rows = [{"number": t.number, "params": _readable(t.params, point.space), "state": t.state.name,
                 "value": t.value, "run_id": point.trial_run(_readable(t.params, point.space)).run_id}
                for t in trials]
        arm = {"storage": str((folder / f"{point.point_id}.journal").relative_to(store_obj.root)),
               "space": point.space, "trials": rows, "best": None, "run_ids": []}
        if sum(t.state.is_finished() for t in trials) < s["trials"]:
            say(f"search {point.key}: {sum(t.state.is_finished() for t in trials)} of {s['trials']} trials done; "
                f"its best setting runs when all are")
        elif done:
            sign = 1 if direction == "maximize" else -1
            best = max(done, key=lambda t: (sign * t.value, -t.number))
            params = _readable(best.params, point.space)
            runs = [point.trial_run(params, seed) for seed in study.seeds]
            arm.update(best={"number": best.number, "params": params, "value": best.value},
                       run_ids=[r.run_id for r in runs])
            finals += runs
            say(f"search {point.key}: best of {len(trials)} trials "
                f"{', '.join(f'{k}={v}' for k, v in params.items())} (val {metric} {best.value:.4f}, seed "
                f"{study.seeds[0]}); running it on seed(s) {', '.join(map(str, study.seeds))}")
        else:
            say(f"search {point.key}: no trial succeeded; the arm has no runs")
        record["arms"][point.key] = arm
        record["run_ids"] += arm["run_ids"]
    store_obj.write_search(study.name, record)
    execute(finals)
    return record

"""Hyperparameter search through Optuna (``search = {...}`` and range tables) on tiny studies: equal trials per arm,
each trial a stored run chosen on validation, resume after an interrupt, a deterministic sampler, bad input, Ray."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

optuna = pytest.importorskip("optuna")

from peftbench.cli import main  # noqa: E402
from peftbench.config import expand_runs, load_study  # noqa: E402
from peftbench.executors import run_study  # noqa: E402
from peftbench.search import points, run_search  # noqa: E402
from peftbench.store import Store, load_results, read_result  # noqa: E402
from tests.conftest import write_study  # noqa: E402

LR = "lr = { low = 1e-2, high = 3e-1, log = true }"
ARMS = f"""
[[arms]]
method = "majority"

[[arms]]
method = "frozen"
{LR}

[[arms]]
method = "lora"
r = 2
epochs = 2
{LR}
"""
SPACE = {"lr": LR, "batch_size": "batch_size = { choices = [16, 32] }",
         "warmup_ratio": "warmup_ratio = { low = 0.0, high = 0.2, step = 0.05 }"}
FROZEN = """
[[arms]]
method = "frozen"
""" + "\n".join(SPACE.values()) + "\n"


SEARCH = 'search = { trials = 3, seed = 0 }\nreport = { reference = "frozen" }'


def search_study(folder, model, data, arms=ARMS, search=SEARCH, seeds="[0, 1]"):
    folder.mkdir(parents=True, exist_ok=True)
    return write_study(folder / "study.toml", model, data, arms, extra=search, seeds=seeds)


def trial_params(record):
    return {arm: [t["params"] for t in a["trials"]] for arm, a in record["arms"].items()}


@pytest.fixture(scope="module")
def frozen_study(tmp_path_factory, tiny_minilm_like, tiny_data):
    folder = tmp_path_factory.mktemp("frozen-search")
    return search_study(folder, tiny_minilm_like, tiny_data, FROZEN, "search = { trials = 3, batch = 2 }", "[0]")


@pytest.fixture(scope="module")
def uninterrupted(frozen_study, tmp_path_factory):
    """The frozen-arm search run through once, without interruption."""
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    return store, run_search(load_study(frozen_study), store)


def test_every_arm_gets_the_same_trials_each_a_stored_run_chosen_on_validation(tmp_path, tiny_minilm_like,
                                                                             tiny_data, capsys):
    study = search_study(tmp_path, tiny_minilm_like, tiny_data)
    store = tmp_path / "store"
    assert main(["validate", str(study), "--no-data"]) == 0
    out = capsys.readouterr().out
    assert "tiny: 2 runs" in out  # the majority arm (no lr): its 2 seeds are fixed runs
    assert "search: tpe, 3 trials per arm on seed 0 for 2 searched arm(s) (lr)" in out

    assert main(["run", str(study), "--store", str(store)]) == 0
    record = Store(store).read_search("tiny")
    assert sorted(a.rsplit(" | ", 1)[1] for a in record["arms"]) == ["frozen", "lora r=2"]
    assert {len(a["trials"]) for a in record["arms"].values()} == {3}  # the same budget for every arm
    for arm in record["arms"].values():
        for trial in arm["trials"]:
            result = read_result(store / trial["run_id"])  # an ordinary stored run of the sampled setting
            assert result["status"] == "success" and result["config"]["seed"] == 0
            assert result["config"]["train"]["lr"] == trial["params"]["lr"]
            lr = trial["params"]["lr"]
            assert 1e-2 <= lr <= 3e-1 and lr == float(f"{lr:.4g}")  # in range, rounded to 4 significant digits
            assert trial["value"] == result["metrics"]["validation"]["accuracy"]  # told the validation score
        best = max(arm["trials"], key=lambda t: (t["value"], -t["number"]))
        assert arm["best"]["number"] == best["number"]
        # the best setting runs on every seed; its seed-0 run is the trial itself
        finals = [read_result(store / r)["config"] for r in arm["run_ids"]]
        assert [c["seed"] for c in finals] == [0, 1] and {c["train"]["lr"] for c in finals} == {best["params"]["lr"]}
        assert arm["run_ids"][0] == best["run_id"]
    # the report's runs: the fixed ones and each searched arm's best setting on all seeds, not the other trials
    assert set(record["run_ids"]) == {r.run_id for r in expand_runs(load_study(study))} | {
        r for a in record["arms"].values() for r in a["run_ids"]}
    assert set(pd.read_csv(store / "report" / "runs.csv")["run"]) == set(record["run_ids"])
    trials = {t["run_id"] for a in record["arms"].values() for t in a["trials"]}
    assert set(load_results(store)["run_id"]) == set(record["run_ids"]) | trials
    out = capsys.readouterr().out
    assert "best of 3 trials lr=" in out

    # a re-run with the trials done runs nothing new; report STUDY shows the same runs
    assert main(["run", str(study), "--store", str(store)]) == 0
    assert "0 trained now" in capsys.readouterr().out
    assert Store(store).read_search("tiny") == record
    before = json.loads((store / "report" / "results.json").read_text())["verdicts"]
    assert main(["report", str(study), "--store", str(store)]) == 0
    after = json.loads((store / "report" / "results.json").read_text())["verdicts"]
    assert before == after and len(after) == 2  # majority and lora r=2 against the frozen arm


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupted_search_resumes_where_it_stopped(tmp_path, frozen_study, uninterrupted, when):
    """Interrupted in its second round (the third trial asked, its run not yet trained / trained but not told): the
    re-run tells that trial, asks nothing more, and ends where the uninterrupted search did."""
    study, store = load_study(frozen_study), tmp_path / "store"
    calls = []

    def interrupted(runs):
        calls.append(runs)
        if len(calls) == 3:  # fixed runs (none), round 1 (2 trials), round 2 (the third)
            if when == "after":
                run_study(study, store, runs=runs)
            raise KeyboardInterrupt
        return run_study(study, store, runs=runs)

    with pytest.raises(KeyboardInterrupt):
        run_search(study, store, interrupted)
    assert len(calls[1]) == 2 and len(calls[2]) == 1
    trained = []

    def counting(runs):
        summary = run_study(study, store, runs=runs)
        trained.append(summary.done)
        return summary

    record = run_search(study, store, counting)
    assert trained == [0, 0 if when == "after" else 1, 0]  # fixed, the told-late trial, the best on seed 0
    ref_store, reference = uninterrupted
    assert trial_params(record) == trial_params(reference)
    assert [t["run_id"] for a in record["arms"].values() for t in a["trials"]] == \
        [t["run_id"] for a in reference["arms"].values() for t in a["trials"]]
    (point,) = points(study)
    journal = optuna.load_study(study_name=point.point_id, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(store / record["arms"][point.key]["storage"]))))
    assert len(journal.trials) == 3  # no trial asked twice

    # more trials later: the search continues from the 3 it has
    more = load_study(frozen_study, ["search.trials=4"])
    record4 = run_search(more, store)
    first = trial_params(record4)[point.key]
    assert len(first) == 4 and first[:3] == trial_params(record)[point.key]


def test_the_sampler_seed_decides_the_proposals(tmp_path, frozen_study, uninterrupted):
    _, reference = uninterrupted
    again = run_search(load_study(frozen_study), tmp_path / "again")
    assert trial_params(again) == trial_params(reference)
    other = run_search(load_study(frozen_study, ["search.seed=1"]), tmp_path / "other")
    assert trial_params(other) != trial_params(reference)


def test_a_trial_is_the_run_of_a_fixed_setting(frozen_study, uninterrupted):
    """A trial's run id is that of the same study with the sampled values written in (content-addressed), whatever
    the kind of range (log float, categorical, float with a step)."""
    store, record = uninterrupted
    (arm,) = record["arms"].values()
    params = arm["trials"][0]["params"]
    assert params["batch_size"] in (16, 32) and isinstance(params["batch_size"], int)
    assert params["warmup_ratio"] in (0.0, 0.05, 0.1, 0.15, 0.2)
    text = frozen_study.read_text().replace("search = { trials = 3, batch = 2 }", "")
    for key, line in SPACE.items():
        text = text.replace(line, f"{key} = {params[key]!r}")
    plain = frozen_study.parent / "plain.toml"
    plain.write_text(text)
    (run,) = expand_runs(load_study(plain))
    assert run.run_id == arm["trials"][0]["run_id"]
    assert read_result(store / run.run_id)["config"]["train"]["batch_size"] == params["batch_size"]
    assert not expand_runs(load_study(frozen_study))  # the searched arm has no fixed runs


@pytest.mark.parametrize("sets, message", [
    (["search.trials=0"], "search.trials: expected an integer >= 1"),
    (["search.sampler=grid"], "search.sampler: expected one of tpe, random"),
    (["search.foo=1"], "search: unknown key 'foo'"),
    (["search.batch=0"], "search.batch: expected an integer >= 1"),
    (["arms.1.lr={low=1e-1, high=1e-2}"], "arms[1].lr: expected low < high"),
    (["arms.1.lr={low=1e-3}"], "arms[1].lr.high: missing"),
    (["arms.1.lr={low=-1.0, high=1e-2}"], "arms[1].lr.low: expected a positive learning rate"),
    (["arms.1.weight_decay={low=0.0, high=0.1, log=true}"], "arms[1].weight_decay.log: a log range needs low > 0"),
    (["arms.1.lr={low=1e-3, high=1e-2, log=true, step=1e-3}"], "arms[1].lr.step: not with log = true"),
    (["arms.1.lr={low=1e-3, high=1e-2, sigma=1}"], "arms[1].lr: unknown key 'sigma' in a search range"),
    (["arms.1.batch_size={low=8.5, high=64}"], "arms[1].batch_size.low: expected an integer"),
    (["arms.1.batch_size={choices=[]}"], "arms[1].batch_size.choices: expected a non-empty list"),
    (["arms.1.batch_size={choices=[0, 16]}"], "arms[1].batch_size.choices: expected an integer >= 1"),
    (["arms.1.lr_scheduler={low=1, high=2}"], "arms[1].lr_scheduler: lr_scheduler takes no low/high range"),
    (["arms.1.eval_batch_size={low=8, high=64}"], "arms[1].eval_batch_size: a search range table is only for lr"),
    (["arms.2.r={low=1, high=8}"], "arms[2].r: a search range table is only for train settings"),
    (["arms.1.lr_scheduler=[\"linear\", \"cosine\"]"], "arms[1].lr_scheduler: a list (grid) in an arm with a search"),
    (["arms.1.lr=1e-2", "arms.2.lr=1e-2"], "search: no arm has a train setting to search"),
])
def test_bad_search_settings_are_one_line_errors(tmp_path, tiny_minilm_like, tiny_data, capsys, sets, message):
    study = search_study(tmp_path, tiny_minilm_like, tiny_data)
    args = [a for s in sets for a in ("--set", s)]
    assert main(["validate", str(study), "--no-data"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_range_without_a_search_table_and_until_decided_are_refused(tmp_path, tiny_minilm_like, tiny_data,
                                                                      capsys):
    study = search_study(tmp_path, tiny_minilm_like, tiny_data, search="")
    assert main(["validate", str(study), "--no-data"]) == 2
    assert "arm 'frozen': lr is a search range table, which needs a search table" in capsys.readouterr().err
    study = search_study(tmp_path / "b", tiny_minilm_like, tiny_data)
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store), "--until-decided"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--until-decided does not run a study with a search" in err and len(err.splitlines()) == 1
    assert not store.exists()
    with pytest.raises(Exception, match="runs through peftbench.search.run_search"):
        run_study(load_study(study), store)


def test_without_optuna_the_error_names_the_pip_command(tmp_path, tiny_minilm_like, tiny_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    study = search_study(tmp_path, tiny_minilm_like, tiny_data)
    assert main(["validate", str(study), "--no-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'peftbench[optuna]'" in err and len(err.splitlines()) == 1
    assert main(["run", str(study), "--store", str(tmp_path / "store")]) == 2
    assert not (tmp_path / "store").exists()


def test_ray_runs_the_trials_as_tasks(tmp_path, frozen_study, uninterrupted):
    ray = pytest.importorskip("ray")
    from peftbench.executors import run_ray

    study = load_study(frozen_study)
    store = tmp_path / "store"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        record = run_search(study, store, lambda runs: run_ray(study, store, runs=runs))
    finally:
        ray.shutdown()
    _, reference = uninterrupted
    assert trial_params(record) == trial_params(reference)  # the same proposals, two trials per round as tasks
    assert Store(store).run_ids() == sorted({t["run_id"] for a in record["arms"].values() for t in a["trials"]})


def test_a_trial_held_by_another_runner_stays_open_until_a_later_run(tmp_path, frozen_study, uninterrupted):
    """Another live runner holds the first trial's run: that trial is neither failed nor re-asked, the arm's best
    setting waits, and a re-run after the other runner is gone completes the search as if nothing happened."""
    _, reference = uninterrupted
    (arm,) = reference["arms"]
    held = reference["arms"][arm]["trials"][0]["run_id"]
    study, store = load_study(frozen_study), Store(tmp_path / "store")
    assert store.claim(held, "other:runner")
    record = run_search(study, store.root)
    states = [t["state"] for t in record["arms"][arm]["trials"]]
    assert states == ["RUNNING", "COMPLETE", "COMPLETE"] and record["arms"][arm]["run_ids"] == []
    store.release(held, "other:runner")
    record = run_search(study, store.root)
    assert trial_params(record) == trial_params(reference)
    assert record["arms"][arm]["best"] == reference["arms"][arm]["best"]

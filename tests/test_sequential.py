"""``peftbench run --until-decided`` and ``peftbench plan`` on a tiny study (tiny random model, seconds), the majority
baseline, and their bad input."""

from __future__ import annotations

import json

import pytest

from peftbench.cli import main
from peftbench.store import Store, load_results
from tests.conftest import write_study

ARMS = """
[[arms]]
method = "majority"

[[arms]]
method = "lora"
r = 2
lr = 3e-2

[[arms]]
method = "full"
"""


@pytest.fixture
def study(tmp_path, tiny_minilm_like, tiny_data):
    return write_study(tmp_path / "study.toml", tiny_minilm_like, tiny_data, ARMS, seeds="[0, 1]",
                       extra='description = "Is LoRA r=2 as good as full fine-tuning on the toy task?"')


def test_until_decided_adds_seeds_to_undecided_arms_only(tmp_path, study, capsys):
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store), "--until-decided", "--max-seeds", "4"]) == 0
    out = capsys.readouterr().out
    record = Store(store).read_sequential("tiny")
    assert record["schedule"] == [2, 4] and sum(record["levels"]) == pytest.approx(0.025)
    assert "look 1/2" in out
    df = load_results(store)
    seeds = df.groupby("arm")["seed"].apply(lambda s: sorted(s)).to_dict()
    # the majority class (60 test examples, ~50% accuracy) is decided inferior at the first look: no more seeds
    assert seeds["majority"] == [0, 1]
    assert record["decided"]["{} | tiny | majority".format(df["model"].iloc[0])]["look"] == 1
    looked_twice = len(record["looks"]) == 2
    assert seeds["full"] == ([0, 1, 2, 3] if looked_twice else [0, 1])  # the reference follows the open arms
    assert sorted(record["run_ids"]) == sorted(df["run_id"])  # every added run is an ordinary stored run
    report = (store / "report" / "report.md").read_text()
    assert "Is LoRA r=2 as good as full fine-tuning" in report and "looks at [2, 4] seeds" in report
    # the same command again resumes from the store: nothing is trained twice
    assert main(["run", str(study), "--store", str(store), "--until-decided", "--max-seeds", "4"]) == 0
    assert "0 trained now" in capsys.readouterr().out
    # a later report of the study shows the same verdicts (it reads the record from the store)
    before = json.loads((store / "report" / "results.json").read_text())["verdicts"]
    assert main(["report", str(study), "--store", str(store)]) == 0
    after = json.loads((store / "report" / "results.json").read_text())["verdicts"]
    assert [v["verdict"] for v in before] == [v["verdict"] for v in after]
    assert main(["plan", str(study), "--store", str(store)]) == 0
    assert "Verdict" in capsys.readouterr().out


def test_majority_baseline_predicts_the_most_frequent_training_class(tmp_path, study):
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store), "--set", "seeds=[0]", "--no-report"]) == 0
    df = load_results(store).set_index("arm")
    result = json.loads((store / df.loc["majority", "run_id"] / "result.json").read_text())
    assert result["params"]["trainable"] == 0
    assert result["baseline_info"]["class_prior"] == pytest.approx([0.5, 0.5], abs=0.05)
    assert df.loc["majority", "test_accuracy"] == pytest.approx(0.5)  # the tiny test split is balanced


@pytest.mark.parametrize("args, message", [
    (["--until-decided", "--max-seeds", "0"], "--max-seeds: expected an integer >= 1"),
    (["--until-decided", "--max-seeds", "1"], "--max-seeds: expected at least the study's 2 seed(s)"),
    (["--max-seeds", "4"], "--max-seeds: only with --until-decided"),
    (["--until-decided", "--seed-step", "0"], "--seed-step: expected an integer >= 1"),
    (["--until-decided", "--set", "report.reference=lora r=64"], "report.reference: 'lora r=64' names no arm"),
    (["--until-decided", "--set", "arms.2.method=frozen"], "--until-decided needs a reference arm"),
    (["--until-decided", "--set", "report.margin=0"], "report.margin: expected a number of points > 0"),
])
def test_bad_sequential_input_exits_2_and_touches_nothing(tmp_path, study, capsys, args, message):
    store = tmp_path / "store"
    store.mkdir()
    (store / "keep.txt").write_text("x")
    assert main(["run", str(study), "--store", str(store)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert [p.name for p in store.iterdir()] == ["keep.txt"]

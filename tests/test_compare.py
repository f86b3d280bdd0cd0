"""Studies are never pooled, and ``peftbench compare`` puts them side by side (issue 14, point 5); load_results keeps
every config field (point 8). Synthetic stores written as docs/design.md describes (tests/test_report.py's writer):
no training."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peftbench import load_results
from peftbench.cli import main
from peftbench.report import analyse, load_curves, load_predictions, load_runs, settings_of, study_analysis
from peftbench.report.compare import column_groups, side_by_side
from tests.conftest import write_study
from tests.test_report import N_TEST, correct_mask, predictions, toy_split, write_run

TEST = toy_split()


def _runs(store: Path, study: str, accuracies: dict[str, float], dataset: dict | None = None) -> None:
    """Seeds 0–2 of each arm (``lora r=1``, ``full``, ``frozen``) at the given test accuracy."""
    kinds = {"lora r=1": ("lora", 1), "full": ("full", None), "frozen": ("frozen", None)}
    for arm, acc in accuracies.items():
        method, r = kinds[arm]
        for seed in range(3):
            mask = correct_mask(N_TEST, acc + 0.01 * seed, seed=zlib.crc32(f"{study} {arm} {seed}".encode()))
            write_run(store, arm, method, seed, 1e-3, predictions(TEST, mask, seed), r=r, study=study,
                      dataset=dataset)


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory) -> Path:
    """The issue's case: a demo store plus three `lora r=1` runs of another study with max_train = 200."""
    store = tmp_path_factory.mktemp("two") / "runs"
    _runs(store, "demo", {"lora r=1": 0.80, "full": 0.85})
    _runs(store, "small", {"lora r=1": 0.60}, dataset={"max_train": 200})
    return store


def _accuracy(store: Path, study: str, arm: str) -> float:
    df = load_results(store)
    return df[(df["study"] == study) & (df["arm"] == arm)]["test_accuracy"].mean()


def test_two_studies_in_one_store_are_not_pooled(two_studies, tmp_path):
    runs = load_runs(two_studies)
    analysis = analyse(runs, load_predictions(runs), load_curves(runs), settings_of(None))
    lora = analysis["table"][analysis["table"]["arm"] == "lora r=1"].set_index("study")
    assert sorted(lora.index) == ["demo", "small"]  # two rows, not one "Seeds 3" row of 6 runs
    assert (lora["seeds"] == 3).all() and all(len(ids.split()) == 3 for ids in lora["run_ids"])
    for study in ("demo", "small"):
        assert lora.loc[study, "accuracy"] == pytest.approx(_accuracy(two_studies, study, "lora r=1"))
    assert sorted(analysis["studies"]) == ["demo", "small"]
    # The verdict compares demo's lora with demo's full only; "small" has no reference arm, so no verdict.
    v = analysis["verdicts"]
    assert v[["study", "arm", "reference"]].values.tolist() == [["demo", "lora r=1", "full"]]
    assert v["candidate_score"].iloc[0] == pytest.approx(100 * _accuracy(two_studies, "demo", "lora r=1"))
    nuisance = analysis["nuisance"]
    assert len(nuisance[nuisance["arm"] == "lora r=1"]) == 2 and set(nuisance["study"]) == {"demo", "small"}

    out = main(["report", str(two_studies), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert out == 0 and "## Study `demo`" in md and "## Study `small`" in md
    assert md.count("### Results per arm") == 2 and "never pooled" in md
    table = (tmp_path / "report" / "table.md").read_text()
    assert table.startswith("| Study | Arm |") and "| small | lora r=1 | 3 |" in table
    plots = {p.name for p in (tmp_path / "report" / "plots").iterdir()}
    assert "study1-metric_vs_rank.png" in plots and "study2-metric_vs_rank.png" in plots
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["studies"] == ["demo", "small"] and [g["study"] for g in saved["groups"]] == ["demo", "small"]
    assert sorted(a["study"] for a in saved["arms"] if a["arm"] == "lora r=1") == ["demo", "small"]


def test_each_study_section_is_that_study_alone(two_studies, tmp_path):
    """A study's section of the several-study report has exactly the numbers of `report --study NAME`."""
    whole = study_analysis(two_studies)
    assert main(["report", str(two_studies), "--study", "demo", "--out", str(tmp_path / "demo")]) == 0
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "6 runs in" in md and "## Study `" not in md and "max_train" not in md  # one study: as ever
    ids = load_results(two_studies).query("study == 'demo'")["run_id"].tolist()
    alone = study_analysis(two_studies, ids)
    cols = ["arm", "seeds", "accuracy", "accuracy_ci_low", "accuracy_ci_high"]
    pd.testing.assert_frame_equal(whole["studies"]["demo"]["table"][cols], alone["table"][cols])
    pd.testing.assert_frame_equal(whole["studies"]["demo"]["verdicts"], alone["verdicts"])


def test_report_and_plan_of_an_unknown_study_name(two_studies, tmp_path, capsys):
    assert main(["report", str(two_studies), "--study", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no runs of study 'nope' (studies here: demo, small)" in err
    assert main(["plan", str(two_studies)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["Study", "Arm"] and "demo lora r=1" in " ".join(out.split())


@pytest.fixture(scope="module")
def other_store(tmp_path_factory) -> Path:
    """Another store (another dataset, say): the same arms, a frozen arm more, study name "demo" again."""
    store = tmp_path_factory.mktemp("other") / "runs-b"
    _runs(store, "demo", {"lora r=1": 0.70, "full": 0.72, "frozen": 0.50})
    return store


def test_compare_puts_studies_side_by_side(two_studies, other_store, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(two_studies), str(other_store), "--out", str(out)]) == 0
    long = pd.read_csv(out / "comparison.csv")
    # Study "demo" is in both stores, so its two column groups are told apart by the store folder.
    assert list(dict.fromkeys(long["column"])) == ["demo · toy · tiny · runs", "small", "demo · toy · tiny · runs-b"]
    for column, store, study in [("demo · toy · tiny · runs", two_studies, "demo"), ("small", two_studies, "small"),
                                 ("demo · toy · tiny · runs-b", other_store, "demo")]:
        mine = long[long["column"] == column].set_index("arm")
        for arm in mine.index:
            assert mine.loc[arm, "mean"] == pytest.approx(_accuracy(store, study, arm))
    # Each verdict is the one of that study's own report, against that study's reference.
    alone = study_analysis(other_store)["verdicts"].set_index("arm")
    b = long[long["column"] == "demo · toy · tiny · runs-b"].set_index("arm")
    assert b.loc["full", "verdict"] == "reference"
    for arm in ("lora r=1", "frozen"):
        assert b.loc[arm, "verdict"] == alone.loc[arm, "verdict"]
        assert b.loc[arm, "diff_points"] == pytest.approx(alone.loc[arm, "diff_points"])
        assert b.loc[arm, "diff_ci_low"] == pytest.approx(alone.loc[arm, "ci_low"])
    assert b.loc["frozen", "verdict"] == "inferior"
    small = long[long["column"] == "small"]
    assert small["arm"].tolist() == ["lora r=1"] and small["verdict"].isna().all()  # no reference in "small"

    md = (out / "report.md").read_text()
    assert "| Arm | demo · toy · tiny · runs: accuracy | demo · toy · tiny · runs: vs full | small: accuracy |" in md
    row = next(line for line in md.splitlines() if line.startswith("| frozen |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == ["—"] * 4  # frozen is only in the other store
    frozen = b.loc["frozen"]
    assert cells[5].startswith(f"{100 * frozen['mean']:.2f} ± {100 * frozen['std']:.2f} [")
    assert cells[6].startswith("inferior, −")
    assert md.count("### ") == 3 and "→ **inferior**" in md  # the per-study verdicts
    assert "<table" in (out / "report.html").read_text()


def test_compare_one_store_of_two_studies_labels_columns_by_study(two_studies):
    cols = column_groups([two_studies])
    assert [c["label"] for c in cols] == ["demo", "small"]
    long = side_by_side(cols)
    assert long.loc[(long["column"] == "demo") & (long["arm"] == "lora r=1"), "seeds"].item() == 3


@pytest.mark.parametrize("make", ["missing", "empty folder", "text file"])
def test_compare_bad_input_is_one_line_exit_2(tmp_path, capsys, two_studies, make):
    bad = tmp_path / "bad"
    if make == "empty folder":
        bad.mkdir()
    elif make == "text file":
        bad = tmp_path / "notes.txt"
        bad.write_text("not a study\n")
    assert main(["compare", str(two_studies), str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftbench: error: ") and str(bad) in err
    assert not (tmp_path / "out").exists()


def test_load_results_columns(two_studies):
    df = load_results(two_studies)
    lora = df[df["arm"] == "lora r=1"].set_index("study")
    assert {"study", "arm", "model", "dataset", "method", "seed", "r", "lora_alpha", "lr", "epochs",
            "param_r", "param_target_modules", "train_lr", "train_lr_scheduler", "dataset_source",
            "dataset_max_train", "test_accuracy", "val_accuracy", "params_trainable", "path"} <= set(df.columns)
    assert (lora["param_r"] == lora["r"]).all() and (lora["train_lr"] == lora["lr"]).all()
    assert lora.loc["small", "dataset_max_train"].tolist() == [200] * 3
    assert np.isnan(lora.loc["demo", "dataset_max_train"].astype(float)).all()


def test_compare_a_study_file_with_a_store(tmp_path, tiny_bert, tiny_data, two_studies):
    """A study file is read as `peftbench report STUDY` reads it: its runs in its store, its [report] settings."""
    arms = '[[arms]]\nmethod = "untrained"\n\n[[arms]]\nmethod = "frozen"\nlr = 1e-1\n'
    study = write_study(tmp_path / "tiny.toml", tiny_bert, tiny_data, arms,
                        extra='[report]\nreference = "frozen"\nmargin = 5.0\n', seeds="[0, 1]")
    store = tmp_path / "runs"
    assert main(["run", str(study), "--store", str(store), "--no-report", "--set", "train.epochs=1",
                 "--set", "datasets.tiny.max_train=64"]) == 0
    cols = column_groups([study, two_studies], ["train.epochs=1", "datasets.tiny.max_train=64"], store)
    assert [c["label"] for c in cols] == ["tiny", "demo", "small"]
    assert cols[0]["settings"]["reference"] == "frozen" and cols[0]["settings"]["margin"] == 5.0
    long = side_by_side(cols).set_index(["column", "arm"])
    assert long.loc[("tiny", "frozen"), "verdict"] == "reference"
    assert long.loc[("tiny", "untrained"), "margin"] == 5.0 and long.loc[("demo", "full"), "margin"] == 1.0
    assert long.loc[("tiny", "untrained"), "mean"] == pytest.approx(_accuracy(store, "tiny", "untrained"))

"""Progress output: plain lines with ETAs in a log, bars only on a terminal, no library loading bars or load reports,
no ``None`` in labels, and an end-of-study table that shows each arm's chosen nuisance setting (as the report does)."""

import re

import pytest

from peftbench import progress
from peftbench.cli import main
from peftbench.config import expand_runs, load_study
from peftbench.report import load_runs
from peftbench.report.tables import select_nuisance
from tests.conftest import write_study

ARMS = """
[[arms]]
method = "untrained"

[[arms]]
method = "lora"
r = 2
lr = [3e-2, 1e-3]
"""


@pytest.fixture
def study(tmp_path, tiny_bert, tiny_data):
    return write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS)


def test_a_log_gets_one_line_per_epoch_and_run_and_no_bars(study, tmp_path, capfd):
    assert main(["run", str(study), "--store", str(tmp_path / "store"), "--no-report", "--set", "train.epochs=2",
                 "--set", "datasets.tiny.max_train=64"]) == 0
    out, err = capfd.readouterr()
    for text in (out, err):
        assert "\r" not in text and "\x1b[" not in text  # no bar redraws, no cursor codes
        assert "Loading weights" not in text and "LOAD REPORT" not in text and "MISSING" not in text
        assert "None" not in text
    epochs = [line for line in out.splitlines() if line.startswith("epoch  lora r=2")]
    assert len(epochs) == 4 and epochs[0].endswith(tuple("0123456789")) and "1/2, val acc" in epochs[0]
    assert "run ETA" in epochs[0] and "run ETA" not in epochs[1]  # the last epoch has nothing left
    done = [line for line in out.splitlines() if line.startswith("done   ")]
    assert len(done) == 3 and "(1/3; study ETA " in done[0] and done[-1].endswith("(3/3)")
    assert done[0].startswith("done   untrained | ") and "lr=" not in done[0]


def test_a_terminal_gets_bars_instead_of_epoch_lines(study, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert main(["run", str(study), "--store", str(tmp_path / "store"), "--no-report", "--set", "train.epochs=2",
                 "--set", "datasets.tiny.max_train=64"]) == 0
    out, err = capsys.readouterr()
    assert "step/s" in err or "s/step" in err  # the per-step bar of a run
    assert "study tiny" in err
    assert not any(line.startswith("epoch  ") for line in out.splitlines())


def test_labels_leave_out_missing_settings(study):
    labels = [run.label for run in expand_runs(load_study(study))]
    assert labels[0].startswith("untrained | ") and "lr=" not in labels[0] and "None" not in labels[0]
    assert "| lr=0.03 | seed=0" in labels[1]


def test_end_of_study_table_shows_the_chosen_setting_of_each_arm(study, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store), "--no-report", "--set", "train.epochs=2",
                 "--set", "datasets.tiny.max_train=64"]) == 0
    out = capsys.readouterr().out
    run_ids = [run.run_id for run in expand_runs(load_study(study, ["train.epochs=2", "datasets.tiny.max_train=64"]))]
    chosen = select_nuisance(load_runs(store, run_ids)).set_index("arm")  # what the report picks
    header = next(line for line in out.splitlines() if line.lstrip().startswith("dataset"))
    assert header.split()[:5] == ["dataset", "arm", "setting", "settings", "runs"]
    (row,) = [line for line in out.splitlines() if re.match(r"\s*tiny\s+lora r=2\s", line)]
    assert row.split()[3:6] == [chosen.loc["lora r=2", "setting"], "2", "1"]  # one of two settings: 1 run, not 2
    assert f"{chosen.loc['lora r=2', 'test_accuracy']:.4f}" in row

"""The learning-rate readout (issue 16, point 9) on a synthetic store: each arm's best lr picked on validation, its
ratio to the reference's, the validation score over the grid, and the section shown only when both sweep the lr."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pandas as pd
import pytest

from peftbench.report import analyse, load_curves, load_predictions, load_runs, settings_of, tables, write_report
from tests.test_report import N_TEST, correct_mask, predictions, toy_split, write_run

# arm: (method, r, {lr: validation accuracy}); test accuracy is the same everywhere, so only validation can choose.
GRID = {
    "full": ("full", None, {1e-5: 0.80, 3e-5: 0.86, 1e-4: 0.83}),
    "lora r=8": ("lora", 8, {1e-4: 0.82, 3e-4: 0.87, 1e-3: 0.84}),
    "lora r=16": ("lora", 16, {1e-4: 0.81, 1e-3: 0.85}),  # best at the end of its grid
    "lora r=4": ("lora", 4, {3e-4: 0.84}),  # one lr: no readout
}


def _store(root: Path, grid: dict) -> Path:
    test = toy_split()
    for arm, (method, r, lrs) in grid.items():
        for lr, val in lrs.items():
            for seed in (0, 1):
                mask = correct_mask(N_TEST, 0.8, seed=zlib.crc32(f"{arm} {lr} {seed}".encode()))
                write_run(root, arm, method, seed, lr, predictions(test, mask, seed), val_accuracy=val, r=r)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("lr_store"), GRID)


@pytest.fixture(scope="module")
def analysis(store):
    runs = load_runs(store)
    return analyse(runs, load_predictions(runs), load_curves(runs), settings_of(None))


def test_best_lr_and_ratio_to_the_reference(analysis):
    summary = analysis["lr_readout"].set_index("arm")
    assert sorted(summary.index) == ["full", "lora r=16", "lora r=8"]  # lora r=4 swept no lr
    assert summary.loc["full", "best_lr"] == 3e-5 and summary.loc["full", "lr_ratio"] == 1.0
    assert summary.loc["lora r=8", "best_lr"] == 3e-4
    assert summary.loc["lora r=8", "lr_ratio"] == pytest.approx(10.0)
    assert summary.loc["lora r=8", "val_score"] == pytest.approx(0.87) and summary.loc["lora r=8", "lrs"] == 3
    assert summary.loc["lora r=8", "edge"] == "" and summary.loc["lora r=16", "edge"] == "highest"
    assert summary.loc["lora r=16", "lr_ratio"] == pytest.approx(1e-3 / 3e-5)
    assert (summary["reference"] == "full").all()
    # The best lr is the one the report's nuisance choice keeps for the arm's table row.
    table = analysis["table"].set_index("arm")
    for arm in summary.index:
        assert table.loc[arm, "lr"] == summary.loc[arm, "best_lr"]


def test_grid_holds_the_validation_score_of_every_lr(analysis):
    grid = analysis["lr_grid"]
    lora = grid[grid["arm"] == "lora r=8"].set_index("lr")
    assert list(lora.index) == [1e-4, 3e-4, 1e-3]
    assert lora["val_score"].tolist() == pytest.approx([0.82, 0.87, 0.84])
    assert lora["best"].tolist() == [False, True, False] and (lora["seeds"] == 2).all()
    assert "lora r=4" not in set(grid["arm"])


def test_other_swept_settings_are_taken_at_their_best_and_loss_is_lower_is_better():
    def row(arm, lr, sched, score):
        train = {"lr": lr, "lr_scheduler": sched}
        return {"model": "m", "dataset": "d", "arm": arm, "method": arm, "r": None,
                "nuisance": json.dumps(train, sort_keys=True), "setting": "", "seeds": 1, "val_score": score}

    scores = pd.DataFrame([row("full", 1e-5, "linear", 0.50), row("full", 1e-5, "cosine", 0.40),
                           row("full", 1e-4, "linear", 0.45), row("full", 1e-4, "cosine", 0.30),
                           row("lora", 1e-4, "linear", 0.60), row("lora", 1e-3, "linear", 0.20)])
    scores["chosen"] = False
    scores.loc[[3, 5], "chosen"] = True  # what nuisance_scores picks for a loss: the lowest
    summary, grid = tables.lr_readout(scores, "full", "loss")
    summary = summary.set_index("arm")
    assert summary.loc["full", "best_lr"] == 1e-4 and summary.loc["lora", "lr_ratio"] == pytest.approx(10.0)
    full = grid[grid["arm"] == "full"].set_index("lr")["val_score"]
    assert full.to_dict() == {1e-5: 0.40, 1e-4: 0.30}  # each lr at its best scheduler (lowest loss)


def test_report_shows_the_readout_table_and_plot(store, tmp_path):
    out = write_report(store, out_dir=tmp_path / "report")
    md = (out / "report.md").read_text()
    assert "Learning rate: each arm's best against the reference's" in md
    assert "`lora r=8`: best learning rate 0.0003 (of 3 tried, on validation), 10× `full`'s best 3e-05." in md
    assert "at the highest lr tried, so the ratio is only a bound" in md
    assert (out / "plots" / "lr_curves.png").stat().st_size > 1000
    assert "Learning rate: each arm" in (out / "report.html").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in saved["lr_readout"]} == {"full", "lora r=8", "lora r=16"}


def test_no_readout_when_the_reference_does_not_sweep_the_lr(tmp_path):
    grid = {"full": ("full", None, {3e-5: 0.86}), "lora r=8": GRID["lora r=8"]}
    store = _store(tmp_path / "store", grid)
    out = write_report(store, out_dir=tmp_path / "report")
    assert "Learning rate: each arm" not in (out / "report.md").read_text()
    assert not (out / "plots" / "lr_curves.png").exists()
    runs = load_runs(store)
    assert tables.lr_readout(tables.nuisance_scores(runs), "full")[0].empty

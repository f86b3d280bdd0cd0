"""The report's HTML, calibration, many-class, out-of-scope, several-dataset and LLM-cost parts (issue 14, point 7),
on synthetic stores written as tests/test_report.py writes them: no training."""

from __future__ import annotations

import base64
import json
import re
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from peftbench.config import ConfigError, load_study
from peftbench.report import calibration, errors, write_report
from tests.test_report import correct_mask, predictions, toy_split, write_run

INTENTS = [f"intent_{i:02d}" for i in range(29)] + ["oos"]  # 30 classes, the last one out of scope


def multiclass_predictions(n: int, k: int, accuracy: float, seed: int) -> pd.DataFrame:
    """k-class predictions right at exactly ``accuracy``, the wrong ones on a seeded other class; the predicted
    class gets probability 0.6–0.95, the rest shared equally."""
    rng = np.random.default_rng(seed)
    gold = np.random.default_rng(7).integers(0, k, size=n)  # one test set for every run
    right = correct_mask(n, accuracy, seed)
    pred = np.where(right, gold, (gold + rng.integers(1, k, size=n)) % k)
    conf = rng.uniform(0.6, 0.95, size=n)
    probs = []
    for p, c in zip(pred, conf):
        row = np.full(k, (1 - c) / (k - 1))
        row[p] = c
        probs.append(row.tolist())
    return pd.DataFrame({"id": np.arange(n), "text": [f"text {i}" for i in range(n)], "label": gold, "pred": pred,
                         "probs": probs, "length": rng.integers(3, 30, size=n)})


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> Path:
    """'intents' (30 classes, one 'oos'): full, lora r=4 (2 seeds each), tfidf and an llm with a request cost;
    'toy' (binary): full and lora r=4."""
    root = tmp_path_factory.mktemp("two")
    n = 600
    for arm, method, r, trainable, accs in (("full", "full", None, 1_000_000, [0.80, 0.82]),
                                            ("lora r=4", "lora", 4, 10_770, [0.78, 0.79])):
        for seed, acc in enumerate(accs):
            preds = multiclass_predictions(n, 30, acc, zlib.crc32(f"{arm}{seed}".encode()))
            write_run(root, arm, method, seed, 1e-3, preds, r=r, trainable=trainable, labels=INTENTS,
                      dataset="intents")
    write_run(root, "tfidf", "tfidf", 0, 1.0, multiclass_predictions(n, 30, 0.7, 3), labels=INTENTS,
              dataset="intents", with_params=False)
    llm = multiclass_predictions(n, 30, 0.75, 4).assign(probs=[[np.nan] * 30] * n)
    llm.loc[:9, "pred"] = -1
    write_run(root, "llm", "llm", 0, 1.0, llm, labels=INTENTS, dataset="intents", with_params=False,
              costs={"estimated_cost_usd": 0.0123, "train_time_s": 0.0})
    test = toy_split(200)
    for arm, method, r, trainable, accs in (("full", "full", None, 1_000_000, [0.9, 0.91]),
                                            ("lora r=4", "lora", 4, 10_770, [0.89, 0.9])):
        for seed, acc in enumerate(accs):
            mask = correct_mask(200, acc, zlib.crc32(f"toy {arm} {seed}".encode()))
            write_run(root, arm, method, seed, 1e-3, predictions(test, mask, seed), r=r, trainable=trainable)
    return root


@pytest.fixture(scope="module")
def report(two_datasets, tmp_path_factory) -> Path:
    study = SimpleNamespace(name="two datasets", description="", report={"out_of_scope_label": "oos"})
    return write_report(two_datasets, study=study, out_dir=tmp_path_factory.mktemp("report"))


def section(md: str, heading: str) -> str:
    """The text of a report.md section from its heading to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    body = md.split(heading, 1)[1]
    return re.split(rf"\n#{{1,{len(level)}}} ", body, maxsplit=1)[0]


# ------------------------------------------------------------------------------------------------------------------
# Calibration and out-of-scope metrics on hand-made predictions
# ------------------------------------------------------------------------------------------------------------------


def test_ece_equals_the_hand_computed_value():
    # Seed 0: three predictions at confidence 0.8 (two right) and two at 0.55 (one right): ECE = 3/5·|2/3 − 0.8| +
    # 2/5·|1/2 − 0.55| = 0.08 + 0.02. Seed 1: every prediction right at confidence 0.9: ECE = 0.1.
    labels = np.array([0, 0, 1, 0, 1])
    seed0 = pd.DataFrame({"label": labels, "pred": [0, 0, 0, 0, 0],
                          "probs": [[0.8, 0.2]] * 3 + [[0.55, 0.45]] * 2})
    seed1 = pd.DataFrame({"label": labels, "pred": labels, "probs": [[0.9, 0.1] if y == 0 else [0.1, 0.9]
                                                                     for y in labels]})
    bins = calibration.reliability(*calibration.top_label(seed0))
    assert bins["n"].tolist() == [2, 3] and bins["accuracy"].tolist() == pytest.approx([0.5, 2 / 3])
    assert calibration.ece(bins) == pytest.approx(0.1)
    summary, pooled = calibration.arm_calibration({0: seed0, 1: seed1})
    assert summary["ece_seed_mean"] == pytest.approx(0.1) and summary["ece_seed_std"] == pytest.approx(0.0, abs=1e-12)
    # pooled: 0.55 (2, 1 right), 0.8 (3, 2 right), 0.9 (5, 5 right) of 10
    assert summary["ece"] == pytest.approx(0.2 * 0.05 + 0.3 * (0.8 - 2 / 3) + 0.5 * 0.1)
    assert summary["n"] == 10 and summary["seeds"] == 2 and pooled["n"].sum() == 10
    # an arm without probabilities (an llm) has no calibration
    table, bins = calibration.calibration_table({"llm": {0: seed0.assign(probs=[[np.nan, np.nan]] * 5)},
                                                 "a": {0: seed0}})
    assert table["arm"].tolist() == ["a"] and list(bins) == ["a"]


def test_out_of_scope_metrics_on_known_predictions():
    labels = ["a", "b", "oos"]
    gold = [0, 1, 2, 2, 0]
    seed0 = pd.DataFrame({"label": gold, "pred": [0, 2, 2, 0, 1]})  # in scope: 1 of 3 right; oos: 1 of 2 found
    seed1 = pd.DataFrame({"label": gold, "pred": [0, 1, 2, 2, 0]})  # everything right
    r = errors.out_of_scope({0: seed0, 1: seed1}, labels, "oos")
    assert r["in_scope_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert r["oos_recall"] == pytest.approx((0.5 + 1) / 2)
    assert r["oos_recall_std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert (r["n_in_scope"], r["n_oos"], r["seeds"]) == (3, 2, 2)
    assert errors.out_of_scope({0: seed0}, labels, "none of them") is None


def test_top_confusions_on_a_known_matrix():
    m = np.array([[5, 3, 0], [1, 8, 1], [0, 4, 0]])
    top = errors.top_confusions(m, ["x", "y", "z"])
    assert top[["true", "predicted", "count"]].values.tolist() == [["z", "y", 4], ["x", "y", 3], ["y", "x", 1],
                                                                   ["y", "z", 1]]
    assert top["share"].tolist() == pytest.approx([1.0, 3 / 8, 0.1, 0.1])


def test_out_of_scope_label_is_a_report_setting(tmp_path):
    base = '[[arms]]\nmethod = "full"\n[report]\n'
    (tmp_path / "ok.toml").write_text(base + 'out_of_scope_label = "oos"\n')
    assert load_study(tmp_path / "ok.toml").report["out_of_scope_label"] == "oos"
    (tmp_path / "bad.toml").write_text(base + "out_of_scope_label = 3\n")
    with pytest.raises(ConfigError, match="out_of_scope_label"):
        load_study(tmp_path / "bad.toml")


# ------------------------------------------------------------------------------------------------------------------
# A report over two datasets, one with 30 classes
# ------------------------------------------------------------------------------------------------------------------


def test_many_classes_top_confusions_and_per_class_csv(report):
    md = (report / "report.md").read_text()
    intents = section(md, "### intents · tiny")  # the error analysis of the 30-class group
    assert "Top confusions of the best arm, full" in md and "| True | Predicted | Count (all seeds) |" in md
    assert "Worst classes of the best arm, full (10 of 30)" in md
    assert "Per-class metrics of the best arm" in md  # only for the binary group
    plots = {p.name for p in (report / "plots").iterdir()}
    assert "confusion_matrix-2.png" in plots and "confusion_matrix-1.png" not in plots  # none drawn for 30 classes
    csv = pd.read_csv(report / "per_class.csv")
    mine = csv[csv["dataset"] == "intents"]
    assert set(mine["arm"]) == {"full", "lora r=4", "tfidf", "llm"}  # every arm, not only the best
    assert (mine.groupby("arm")["label"].nunique() == 30).all()
    full = mine[mine["arm"] == "full"].sort_values("f1")
    worst = full["label"].iloc[0]
    assert f"| {worst} |" in section(md, "Worst classes of the best arm")
    assert intents  # the group has its own heading


def test_out_of_scope_section(report, two_datasets):
    md = (report / "report.md").read_text()
    oos = section(md, "## Out-of-scope detection (`oos`)")
    assert "In-scope accuracy (pts)" in oos and "Out-of-scope recall (pts)" in oos
    assert "`oos` is not one of the labels of `toy`" in oos
    results = json.loads((report / "results.json").read_text())
    group = next(g for g in results["groups"] if g["dataset"] == "intents")
    row = next(r for r in group["out_of_scope"] if r["arm"] == "full")
    runs = [json.loads(p.read_text()) for p in two_datasets.glob("*/result.json")]
    ids = [r["run_id"] for r in runs if r["config"]["arm"] == "full" and r["config"]["dataset"]["name"] == "intents"]
    expected = []
    for i in ids:
        f = pd.read_parquet(two_datasets / i / "predictions.parquet")
        inside = f["label"] != 29
        expected.append(((f["pred"] == f["label"])[inside].mean(), (f["pred"][~inside] == 29).mean()))
    assert row["in_scope_accuracy"] == pytest.approx(np.mean([e[0] for e in expected]))
    assert row["oos_recall"] == pytest.approx(np.mean([e[1] for e in expected]))


def test_calibration_section_and_json(report):
    md = (report / "report.md").read_text()
    cal = section(md, "## Calibration")
    assert "ECE (pts, seeds pooled)" in cal and "| Dataset | Model | Arm |" in cal
    assert "| llm |" not in cal  # no probabilities
    results = json.loads((report / "results.json").read_text())
    group = next(g for g in results["groups"] if g["dataset"] == "intents")
    assert {r["arm"] for r in group["calibration"]} == {"full", "lora r=4", "tfidf"}
    assert all(0 <= r["ece"] <= 1 for r in group["calibration"])
    assert {"reliability-1.png", "reliability-2.png"} <= {p.name for p in (report / "plots").iterdir()}


def test_two_datasets_are_named_in_verdict_and_efficiency_tables(report):
    md = (report / "report.md").read_text()
    for heading in ("## Verdict", "## Efficiency vs `full`"):
        part = section(md, heading)
        header = next(line for line in part.splitlines() if line.startswith("| "))
        assert header.startswith("| Dataset | Model | Arm |"), header
        assert "| intents | tiny |" in part and "| toy | tiny |" in part
    assert "- `intents` · `tiny`: **lora r=4**" in md  # verdict sentences name the dataset too


def test_llm_cost_in_the_efficiency_table(report):
    part = section((report / "report.md").read_text(), "## Efficiency vs `full`")
    assert "LLM cost (USD, estimated)" in part
    llm = next(line for line in part.splitlines() if "| llm |" in line)
    assert "$0.0123" in llm
    assert pd.read_csv(report / "results.csv").set_index("arm")["estimated_cost_usd"].dropna().tolist() == [0.0123]


def test_html_links_only_to_embedded_files_or_urls(report):
    page = (report / "report.html").read_text()
    targets = re.findall(r'(?:href|src)="([^"]*)"', page)
    assert targets and all(t.startswith(("data:", "https://")) for t in targets), \
        [t[:40] for t in targets if not t.startswith(("data:", "https://"))]
    # the report's files are downloads embedded in the page
    downloads = dict(re.findall(r'<a download="([^"]+)" href="data:[^;]+;base64,([^"]+)"', page))
    assert base64.b64decode(downloads["results.csv"]) == (report / "results.csv").read_bytes()
    assert base64.b64decode(downloads["table.tex"]) == (report / "table.tex").read_bytes()
    assert "per_class.csv" in downloads and "report.md" in downloads  # docs/report.md, from the sources
    # report.md keeps relative links to the files beside it, and none to files it does not have
    md = (report / "report.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", md)
    assert links and all((report / link).exists() for link in links), links


def test_verdict_column_is_marked_to_stay_in_view(report):
    page = (report / "report.html").read_text()
    assert '<th class="key">Verdict</th>' in page and "position: sticky" in page
    assert ".wide { overflow: visible; }" in page.split("@media print", 1)[1]  # print: no scroll box to cut it

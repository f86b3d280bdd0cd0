"""The real packaged MiniLM on real data (slow-ish: a few hundred examples, one or two epochs)."""

import json
from pathlib import Path

import pytest

from peftbench.cli import main
from peftbench.store import load_results
from tests.conftest import SHARED

pytestmark = pytest.mark.slow


def test_demo_study_shape_on_a_small_subset(tmp_path, capsys):
    """The built-in demo study itself, shrunk: real MiniLM + Rotten Tomatoes, frozen and LoRA beat the untrained head."""
    store = tmp_path / "runs"
    args = ["run", "--store", str(store), "--set", "seeds=[0]", "--set", "datasets.rotten_tomatoes.max_train=400",
            "--set", "datasets.rotten_tomatoes.max_validation=100", "--set", "datasets.rotten_tomatoes.max_test=300",
            "--set", "train.epochs=1", "--set", "arms=" +
            "[{method='untrained'}, {method='tfidf'}, {method='frozen', lr=2e-3, epochs=8}]",
            "--set", "report.reference=untrained", "--no-report"]  # the demo's reference, full, is not among these arms
    assert main(args) == 0
    df = load_results(store).set_index("method")
    assert (df["status"] == "success").all()
    assert df.loc["untrained", "test_accuracy"] < 0.62
    assert df.loc["frozen", "test_accuracy"] > df.loc["untrained", "test_accuracy"] + 0.08
    assert df.loc["frozen", "params_trainable"] == 384 * 2 + 2
    result = json.loads((store / df.loc["frozen", "run_id"] / "result.json").read_text())
    assert result["pooling"] == "mean" and result["costs"]["frozen_features_cached"]


def test_lora_on_real_minilm_counts_and_learns(tmp_path):
    store = tmp_path / "runs"
    assert main(["train", "--method", "lora", "--r", "4", "--lr", "2e-3", "--epochs", "1", "--max-train", "300",
                 "--max-validation", "100", "--max-test", "200", "--max-length", "48", "--store", str(store),
                 "--no-report"]) == 0
    row = load_results(store).iloc[0]
    assert row["params_adapter"] == 4 * (384 + 384) * 2 * 6
    assert row["params_base_model"] == 22_713_216 - 147_840  # mean pooling: the unused BERT pooler is dropped
    assert row["test_accuracy"] > 0.55


@pytest.mark.skipif(not (SHARED / "twitter_financial_news").is_dir(), reason="../shared/data not present")
def test_financial_sentiment_study_runs_offline_on_the_shared_copy(tmp_path):
    store = tmp_path / "runs"
    study = Path(__file__).resolve().parents[1] / "studies" / "financial_sentiment.toml"
    assert main(["run", str(study), "--store", str(store),
                 "--set", f"datasets.twitter_financial_news.source={SHARED / 'twitter_financial_news'}",
                 "--set", 'models=["builtin:minilm"]', "--set", "seeds=[0]", "--set", "train.epochs=1",
                 "--set", "datasets.twitter_financial_news.max_train=300",
                 "--set", "datasets.twitter_financial_news.max_test=200",
                 "--set", "arms.1.r=4", "--no-report"]) == 0
    df = load_results(store)
    assert set(df["arm"]) == {"full", "lora r=4"} and (df["status"] == "success").all()
    result = json.loads((store / df["run_id"].iloc[0] / "result.json").read_text())
    assert result["labels"] == ["Bearish", "Bullish", "Neutral"]
    assert result["dataset_info"]["validation_carved_from_train"] == 0.2

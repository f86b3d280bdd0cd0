"""The Python API: load_results flattens every config field; load_predictions / load_curves are exported from
peftbench; the README's pandas example runs as written against a store."""

import re
from pathlib import Path

import pytest

import peftbench
from peftbench.cli import main
from tests.conftest import write_study

ARMS = """
[[arms]]
method = "untrained"

[[arms]]
method = "lora"
r = 2
use_dora = true
target_modules = ["query", "value"]
lr = 3e-2
"""
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_bert, tiny_data):
    tmp = tmp_path_factory.mktemp("api")
    study = write_study(tmp / "s.toml", tiny_bert, tiny_data, ARMS)
    assert main(["run", str(study), "--store", str(tmp / "runs"), "--no-report", "--set", "train.epochs=2",
                 "--set", "datasets.tiny.max_train=64", "--set", "train.warmup_ratio=0.1"]) == 0
    return tmp / "runs"


def test_load_results_flattens_every_config_field(store, tiny_data):
    df = peftbench.load_results(store).set_index("method")
    lora = df.loc["lora"]
    assert lora["param_r"] == lora["r"] == 2 and bool(lora["param_use_dora"]) is True
    assert list(lora["param_target_modules"]) == ["query", "value"] and lora["param_lora_alpha"] == lora["lora_alpha"]
    assert lora["train_batch_size"] == 16 and lora["train_warmup_ratio"] == 0.1 and lora["train_max_length"] == 32
    assert lora["train_lr"] == lora["lr"] == 3e-2 and lora["train_epochs"] == lora["epochs"] == 2
    assert lora["train_lr_scheduler"] == lora["lr_scheduler"]
    assert lora["dataset_max_train"] == 64 and lora["dataset_source"] == str(tiny_data)
    assert lora["dataset_name"] == lora["dataset"] == "tiny"
    assert "param_r" in df.columns and df.loc["untrained", "param_r"] != df.loc["untrained", "param_r"]  # NaN


def test_load_predictions_and_curves_are_exported(store):
    from peftbench import load_curves, load_predictions

    assert {"load_predictions", "load_curves"} <= set(peftbench.__all__)
    df = peftbench.load_results(store)
    preds, curves = load_predictions(df), load_curves(df)
    assert set(preds) == set(df["run_id"])
    lora_id = df.loc[df["method"] == "lora", "run_id"].iloc[0]
    assert {"id", "text", "label", "pred", "probs"} <= set(preds[lora_id].columns) and len(preds[lora_id]) == 60
    assert curves[lora_id]["epoch"].tolist() == [1, 2] and "val_accuracy" in curves[lora_id]


def test_readme_pandas_example_runs(store, capsys, monkeypatch):
    text = README.read_text()
    section = text[text.index("**pandas.**"):text.index("## Further documentation")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(store.parent)  # the example reads "runs"
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "train_batch_size" in out and "lora" in out

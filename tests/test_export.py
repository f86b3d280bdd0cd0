"""Export and predict: exported models load with plain transformers (or peft) and give the run's own predictions;
mean-pooled runs round-trip through ``peftbench predict``; bad input exits 2 with one line."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from peftbench.cli import main
from peftbench.store import load_results
from tests.conftest import write_study

ARMS = '[[arms]]\nmethod = "lora"\nr = 4\nlr = 1e-2\n[[arms]]\nmethod = "full"\nlr = 1e-3\n'


def _train(tmp, model, data, arms=ARMS):
    """fp32 runs: their stored predictions are compared with fp32 inference to 1e-5."""
    study = write_study(tmp / "s.toml", model, data, arms)
    main(["run", str(study), "--store", str(tmp / "store"), "--no-report", "--set", "train.epochs=2",
          "--set", "datasets.tiny.max_train=64", "--set", "train.bf16=false"])
    return load_results(tmp / "store").set_index("method")


@pytest.fixture(scope="module")
def cls_runs(tmp_path_factory, tiny_bert, tiny_data):
    return _train(tmp_path_factory.mktemp("cls"), tiny_bert, tiny_data)


@pytest.fixture(scope="module")
def mean_runs(tmp_path_factory, tiny_minilm_like, tiny_data):
    return _train(tmp_path_factory.mktemp("mean"), tiny_minilm_like, tiny_data, ARMS.split("[[arms]]\nmethod = \"full")[0])


def stored(run_dir) -> tuple[list[str], np.ndarray]:
    preds = pd.read_parquet(Path(run_dir) / "predictions.parquet").sort_values("id")
    return preds["text"].tolist(), np.stack(preds["probs"].to_numpy())


@torch.no_grad()
def plain_transformers_probs(folder, texts) -> tuple[np.ndarray, list[str]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    probs = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    return probs.numpy(), [model.config.id2label[i] for i in probs.argmax(-1).tolist()]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cls_run_exported_merged_loads_in_plain_transformers_with_the_same_predictions(cls_runs, tmp_path, method):
    run_dir = cls_runs.loc[method, "path"]
    out = tmp_path / "export"
    assert main(["export", run_dir, str(out), "--merge"]) == 0
    texts, expected = stored(run_dir)
    probs, labels = plain_transformers_probs(out, texts)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert labels == [["negative", "positive"][i] for i in expected.argmax(1)]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"]["positive"] == 1
    assert "AutoModelForSequenceClassification" in (out / "README.md").read_text()
    assert not (out / "adapter_config.json").exists()


def test_lora_run_exported_as_adapter_loads_with_peft(cls_runs, tmp_path):
    from peft import PeftModel

    run_dir = cls_runs.loc["lora", "path"]
    out = tmp_path / "adapter"
    assert main(["export", run_dir, str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    info = json.loads((out / "peftbench_export.json").read_text())
    assert info["layout"] == "adapter" and info["labels"] == ["negative", "positive"]
    base = AutoModelForSequenceClassification.from_pretrained(info["model"], num_labels=2)
    model = PeftModel.from_pretrained(base, out).eval()
    texts, expected = stored(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        probs = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)  # the head came with the adapter


def test_mean_pooled_run_round_trips_through_predict_and_plain_torch(mean_runs, tmp_path, capsys):
    run_dir = mean_runs.loc["lora", "path"]
    texts, expected = stored(run_dir)
    pd.DataFrame({"id": np.arange(100, 100 + len(texts)), "review": texts}).to_csv(tmp_path / "in.csv", index=False)

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert main(["export", run_dir, str(merged), "--merge"]) == 0
    assert main(["export", run_dir, str(adapter)]) == 0
    assert json.loads((merged / "peftbench_export.json").read_text())["layout"] == "merged-mean"
    assert json.loads((adapter / "peftbench_export.json").read_text())["layout"] == "adapter"
    for source in (run_dir, merged, adapter):
        out = tmp_path / f"preds-{Path(source).name}.csv"
        assert main(["predict", str(source), "--input", str(tmp_path / "in.csv"), "--output", str(out),
                     "--text-column", "review", "--batch-size", "7"]) == 0
        preds = pd.read_csv(out)
        assert list(preds.columns) == ["id", "text", "pred_label", "prob_negative", "prob_positive"]
        assert preds["id"].tolist() == list(range(100, 100 + len(texts)))
        np.testing.assert_allclose(preds[["prob_negative", "prob_positive"]].to_numpy(), expected, atol=1e-5)
        assert preds["pred_label"].tolist() == [["negative", "positive"][i] for i in expected.argmax(1)]
    assert f"{len(texts)} predictions" in capsys.readouterr().out

    # the README's plain transformers + torch recipe gives the same probabilities
    tokenizer = AutoTokenizer.from_pretrained(merged)
    encoder = AutoModel.from_pretrained(merged).eval()
    head = load_file(merged / "classifier.safetensors")
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    probs = (pooled @ head["weight"].T + head["bias"]).softmax(-1)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)
    assert encoder.config.id2label[1] == "positive"
    assert "pooled = (states * mask).sum(1)" in (merged / "README.md").read_text()


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".parquet"])
def test_predict_reads_and_writes_every_table_format(cls_runs, tmp_path, suffix):
    frame = pd.DataFrame({"text": ["a great fun film", "a dull boring plot", "the movie"]})
    path = tmp_path / f"in{suffix}"
    {".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    out = tmp_path / f"out{suffix}"
    assert main(["predict", cls_runs.loc["full", "path"], "--input", str(path), "--output", str(out),
                 "--device", "cpu"]) == 0
    from peftbench.data import read_table

    preds = read_table(out)
    assert preds["id"].tolist() == [0, 1, 2] and preds["text"].tolist() == frame["text"].tolist()
    np.testing.assert_allclose(preds[["prob_negative", "prob_positive"]].sum(1), 1.0, rtol=1e-5)


def test_bad_input_exits_2_with_one_line(cls_runs, tmp_path, tiny_bert, tiny_data, capsys, monkeypatch):
    failed_store = tmp_path / "failed"
    study = write_study(tmp_path / "f.toml", tiny_bert, tiny_data,
                        '[[arms]]\nmethod = "lora"\nlr = 1e30\nmax_grad_norm = 0.0\n')  # fails: NaN loss
    main(["run", str(study), "--store", str(failed_store), "--no-report"])
    (failed_run,) = [p for p in failed_store.iterdir() if not p.name.startswith(".")]
    good = cls_runs.loc["lora", "path"]
    (tmp_path / "in.csv").write_text("sentence\nhello\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["export", str(tmp_path / "nope"), str(tmp_path / "o")], "no such run folder"),
        (["export", str(failed_run), str(tmp_path / "o")], "did not finish successfully"),
        (["export", good, str(tmp_path / "full")], "already exists and is not an empty folder"),
        (["predict", str(tmp_path / "nope"), "--input", str(tmp_path / "in.csv"), "--output",
          str(tmp_path / "p.csv")], "no such run folder"),
        (["predict", str(failed_run), "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "p.csv")],
         "did not finish successfully"),
        (["predict", good, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "p.csv")],
         "no column 'text' (columns: sentence; choose one with --text-column)"),
        (["predict", good, "--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "p.csv")],
         "no such input file"),
        (["predict", good, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "p.xlsx")],
         "expected an output file ending in"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "o").exists()

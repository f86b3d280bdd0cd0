"""Export and predict: exported models load with plain transformers (or peft) and give the run's own predictions;
mean-pooled runs round-trip through ``peftbench predict``; bad input exits 2 with one line."""

import json
from pathlib import Path
from unittest.mock import Mock

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


@torch.no_grad()
def auto_peft_probs(folder, texts, tokenizer_folder) -> np.ndarray:
    """The README's adapter recipe: AutoPeftModelForSequenceClassification finds the base model on its own."""
    from peft import AutoPeftModelForSequenceClassification

    labels = ["negative", "positive"]
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)}).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    return model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1).numpy()


def test_lora_adapter_of_a_run_and_its_export_load_with_auto_peft(cls_runs, tmp_path, tiny_bert):
    run_dir = Path(cls_runs.loc["lora", "path"])
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["base_model_name_or_path"] == str(tiny_bert)
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    info = json.loads((out / "peftbench_export.json").read_text())
    assert info["layout"] == "adapter" and info["labels"] == ["negative", "positive"]
    texts, expected = stored(run_dir)
    for folder in (run_dir / "adapter", out):  # the head came with the adapter
        np.testing.assert_allclose(auto_peft_probs(folder, texts, out), expected, atol=1e-5)
    assert "AutoPeftModelForSequenceClassification.from_pretrained(" in (out / "README.md").read_text()


def test_export_readme_is_a_model_card_with_the_runs_metrics(cls_runs, tmp_path):
    from huggingface_hub import ModelCard

    run_dir = cls_runs.loc["lora", "path"]
    result = json.loads((Path(run_dir) / "result.json").read_text())
    out = tmp_path / "card"
    assert main(["export", run_dir, str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-classification"
    assert "base_model" not in data  # a local folder is no hub id
    assert {"peftbench", "lora"} <= set(data["tags"])
    assert data["peftbench"]["seed"] == 0 and data["peftbench"]["run_id"] == result["run_id"]
    (entry,) = data["model-index"]
    metrics = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert metrics == {"accuracy": result["metrics"]["test"]["accuracy"], "f1": result["metrics"]["test"]["f1_macro"]}
    assert entry["results"][0]["dataset"]["split"] == "test"
    assert "AutoPeftModelForSequenceClassification" in card.text


def test_builtin_minilm_is_named_by_its_hub_id_for_other_tools():
    from peftbench.export import hub_dataset_id
    from peftbench.models import portable_model_id

    assert portable_model_id("builtin:minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_model_id("prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"
    assert hub_dataset_id("stanfordnlp/imdb") == "stanfordnlp/imdb"
    assert hub_dataset_id("builtin:rotten_tomatoes") is None and hub_dataset_id("/data/x.csv") is None


def test_push_to_hub_creates_the_repo_and_uploads_the_export(cls_runs, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                                              commit_message="m", commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "pushed"
    assert main(["export", cls_runs.loc["full", "path"], str(out), "--push-to-hub", "me/tiny-full", "--private"]) == 0
    assert calls[1] == ("create_repo", "me/tiny-full", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2][:2] == ("upload_folder", "me/tiny-full")
    assert {"README.md", "config.json", "model.safetensors", "peftbench_export.json"} <= set(calls[2][2])
    assert "pushed to the hub: https://huggingface.co/me/tiny-full/commit/abc" in capsys.readouterr().out

    class FailingApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            response = Mock(headers={}, status_code=401)  # (the hub's HTTP client differs across versions)
            raise huggingface_hub.errors.HfHubHTTPError("401 Client Error: Unauthorized\nmore", response=response)

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    assert main(["export", cls_runs.loc["full", "path"], str(tmp_path / "p2"), "--push-to-hub", "me/x"]) == 2
    assert capsys.readouterr().err.strip().endswith("--push-to-hub me/x: 401 Client Error: Unauthorized")


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
    tokenizer = AutoTokenizer.from_pretrained(merged / "encoder")
    encoder = AutoModel.from_pretrained(merged / "encoder").eval()
    head = load_file(merged / "classifier.safetensors")
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    probs = (pooled @ head["weight"].T + head["bias"]).softmax(-1)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)
    assert encoder.config.id2label[1] == "positive"
    readme = (merged / "README.md").read_text()
    assert "pooled = (states * mask).sum(1)" in readme and 'AutoModel.from_pretrained("THIS_FOLDER/encoder")' in readme


def test_mean_pooled_exports_are_refused_by_plain_transformers_and_auto_peft(mean_runs, tmp_path):
    """A mean-pooled export loaded as a [CLS] classifier would be another model: plain transformers and peft's auto
    class fail loudly instead."""
    from peft import AutoPeftModelForSequenceClassification

    run_dir = mean_runs.loc["lora", "path"]
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert main(["export", run_dir, str(merged), "--merge"]) == 0 and main(["export", run_dir, str(adapter)]) == 0
    for load in (AutoModelForSequenceClassification.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match="peftbench-mean-pool"):
            load(merged)
    for folder in (Path(run_dir) / "adapter", adapter):
        assert json.loads((folder / "adapter_config.json").read_text())["task_type"] is None
        with pytest.raises(ValueError, match="peftbench"):
            AutoPeftModelForSequenceClassification.from_pretrained(folder)


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

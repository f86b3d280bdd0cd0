"""End to end: the real CLI on a tiny study with a tiny random model, in a temp dir."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from peftbench.cli import main
from peftbench.config import expand_runs, load_study
from peftbench.runner import execute_run
from peftbench.store import Store, load_results
from tests.conftest import TINY_ARMS, write_study


@pytest.fixture
def tiny_study(tmp_path, tiny_minilm_like, tiny_data):
    return write_study(tmp_path / "study.toml", tiny_minilm_like, tiny_data, TINY_ARMS)


def test_run_writes_a_complete_store(tmp_path, tiny_study, capsys):
    store = tmp_path / "store"
    assert main(["run", str(tiny_study), "--store", str(store), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert f"5 runs (5 trained now, 0 already done) in {store.resolve()}" in out
    df = load_results(store)
    assert len(df) == 5 and (df["status"] == "success").all()
    for _, row in df.iterrows():
        run = Path(row["path"])
        result = json.loads((run / "result.json").read_text())
        assert json.loads((run / "config.json").read_text()) == result["config"]
        preds = pd.read_parquet(run / "predictions.parquet")
        assert len(preds) == result["metrics"]["test"]["n"] == 60
        assert (preds["pred"] == preds["label"]).mean() == pytest.approx(result["metrics"]["test"]["accuracy"])
        assert {"accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_weighted", "roc_auc",
                "confusion_matrix", "loss"} <= result["metrics"]["test"].keys()
        assert result["environment"]["packages"]["torch"] and result["environment"]["dataset_fingerprint"]
        assert result["costs"]["peak_memory_mb"] > 0
        assert result["costs"]["adapter_size_bytes"] > 0
        if row["method"] == "lora":
            assert (run / "adapter" / "adapter_config.json").is_file()
        else:
            assert (run / "model.safetensors").is_file()
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(epochs) == (0 if row["method"] == "untrained" else 5)
    acc = df.set_index("arm")["test_accuracy"]
    # the toy task is learnable: trained arms beat the untrained head
    assert acc["untrained"] <= 0.6
    assert acc["full"] > acc["untrained"] + 0.3
    assert max(acc["lora r=2"], acc["lora r=4"]) > acc["untrained"] + 0.1

    # a second run skips everything
    assert main(["run", str(tiny_study), "--store", str(store), "--no-report"]) == 0
    assert "(0 trained now, 5 already done)" in capsys.readouterr().out

    assert main(["ls", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "lora r=2" in listing and "success" in listing


def test_same_seed_same_metrics(tmp_path, tiny_bert, tiny_data):
    arms = "[[arms]]\nmethod = \"lora\"\nr = 4\n[[arms]]\nmethod = \"full\"\nlr = 1e-3\n"
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, arms)
    for store in ("a", "b"):
        assert main(["run", str(study), "--store", str(tmp_path / store), "--no-report"]) == 0
    a, b = (load_results(tmp_path / s).set_index("run_id").sort_index() for s in ("a", "b"))
    cols = ["test_accuracy", "test_loss", "val_loss"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_failed_run_is_recorded_and_the_study_goes_on(tmp_path, tiny_bert, tiny_data, capsys):
    # (a bad target name no longer gets this far: it is refused when the study is validated, exit 2)
    arms = ("[[arms]]\nmethod = \"lora\"\nlr = 1e30\nmax_grad_norm = 0.0\n"
            "[[arms]]\nmethod = \"frozen\"\nlr = 1e-2\n")
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, arms)
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store), "--no-report"]) == 1
    df = load_results(store).set_index("method")
    assert df.loc["frozen", "status"] == "success"
    assert df.loc["lora", "status"] == "failed"
    assert "NonFiniteLoss" in df.loc["lora", "error"] or "nan" in df.loc["lora", "error"].lower()


def test_nan_loss_is_a_failed_run(tmp_path, tiny_bert, tiny_data):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data,
                        "[[arms]]\nmethod = \"full\"\nlr = 1e30\nmax_grad_norm = 0.0\n")
    assert main(["run", str(study), "--store", str(tmp_path / "st"), "--no-report"]) == 1
    error = load_results(tmp_path / "st")["error"].iloc[0]
    assert "NonFiniteLoss" in error or "nan" in error.lower()


@pytest.mark.parametrize("args, message", [
    (["run", "missing.toml"], "missing.toml: study file not found"),
    (["run", "{study}", "--set", "train.bogus=1"], "train: unknown key 'bogus'"),
    (["run", "{study}", "--set", "datasets.tiny.source=./nope"], "no such file or folder"),
    (["run", "{study}", "--set", "models=[\"./no-model\"]"], "no such local folder"),
    (["run", "{study}", "--set", "datasets.tiny.text_column=sentence"], "no column 'sentence'"),
    (["validate", "{study}", "--set", "arms.2.r=0"], "r: expected a rank >= 1"),
])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(tmp_path, tiny_study, capsys, args, message):
    store = tmp_path / "store"
    store.mkdir()
    (store / "keep.txt").write_text("x")
    args = [a.replace("{study}", str(tiny_study)) for a in args] + ["--store", str(store)] \
        if args[0] != "ls" else args
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert [p.name for p in store.iterdir()] == ["keep.txt"]


def test_validate_lists_runs_without_training(tiny_study, tmp_path, capsys):
    assert main(["validate", str(tiny_study), "--store", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert "tiny: 5 runs, 0 already in" in out and "lora r=2" in out
    assert not (tmp_path / "st").exists()


def test_train_from_flags_and_evaluate_reproduces_test_metrics(tmp_path, tiny_bert, tiny_data, capsys):
    store = tmp_path / "st"
    assert main(["train", "--model", str(tiny_bert), "--dataset", str(tiny_data), "--method", "lora", "--r", "8",
                 "--lora-alpha", "16", "--lr", "5e-3", "--lr-scheduler", "cosine", "--epochs", "2",
                 "--batch-size", "16", "--store", str(store), "--no-report"]) == 0
    (run_dir,) = [store / r for r in Store(store).run_ids()]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["config"]["method_params"]["r"] == 8 and result["config"]["method_params"]["lora_alpha"] == 16
    assert result["config"]["train"]["lr_scheduler"] == "cosine"
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "adapter"), "--split", "test"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(result["metrics"]["test"]["accuracy"])
    assert metrics["loss"] == pytest.approx(result["metrics"]["test"]["loss"], abs=1e-5)


def test_frozen_cached_features_give_the_same_results_as_recomputing(tmp_path, tiny_minilm_like, tiny_data):
    arms = "[[arms]]\nmethod = \"frozen\"\nlr = 1e-2\n"
    results = {}
    for cache in ("true", "false"):
        study = write_study(tmp_path / f"{cache}.toml", tiny_minilm_like, tiny_data, arms)
        store = tmp_path / cache
        assert main(["run", str(study), "--store", str(store), "--no-report",
                     "--set", f"train.cache_frozen_features={cache}"]) == 0
        (run_id,) = Store(store).run_ids()
        results[cache] = json.loads((store / run_id / "result.json").read_text())
        results[cache]["preds"] = pd.read_parquet(store / run_id / "predictions.parquet")
    assert results["true"]["costs"]["frozen_features_cached"] and not results["false"]["costs"][
        "frozen_features_cached"]
    assert results["true"]["metrics"]["test"]["accuracy"] == results["false"]["metrics"]["test"]["accuracy"]
    a = pd.DataFrame(results["true"]["preds"]["probs"].tolist())
    b = pd.DataFrame(results["false"]["preds"]["probs"].tolist())
    assert (a - b).abs().max().max() < 1e-4


def test_frozen_features_are_shared_by_the_runs_of_a_store(tmp_path, tiny_minilm_like, tiny_data, one_thread):
    """The frozen arm's seeds and the untrained baseline run the same encoder over the same data: the first run
    computes its outputs, the others load them, and every run's predictions are those it gives in a store of its
    own. Other token ids (max_length) are another key."""
    arms = ("[[arms]]\nmethod = \"untrained\"\n[[arms]]\nmethod = \"frozen\"\nlr = 1e-2\n"
            "[[arms]]\nmethod = \"frozen\"\nname = \"frozen short\"\nlr = 1e-2\nmax_length = 8\n")
    study = write_study(tmp_path / "s.toml", tiny_minilm_like, tiny_data, arms, seeds="[0, 1]")
    assert main(["run", str(study), "--store", str(tmp_path / "shared"), "--no-report"]) == 0
    results = [json.loads(p.read_text()) for p in (tmp_path / "shared").glob("*/result.json")]
    assert len(results) == 6 and len(list((tmp_path / "shared" / ".cache" / "features").glob("*.pt"))) == 2
    shared_by_length: dict[int, list[bool]] = {}
    for r in results:
        shared_by_length.setdefault(r["config"]["train"]["max_length"], []).append(r["speed"]["frozen_features_shared"])
        assert r["costs"]["feature_cache_s"] > 0  # the encoder pass's cost, also when another run made it
    assert sorted(shared_by_length[32]) == [False, True, True, True] and sorted(shared_by_length[8]) == [False, True]
    for run in expand_runs(load_study(study)):
        alone = tmp_path / f"alone-{run.run_id}"
        store = Store(alone)
        store.open()
        result = execute_run(run, store, torch.device("cpu"))
        assert not result["speed"]["frozen_features_shared"]
        a = pd.read_parquet(alone / run.run_id / "predictions.parquet")["probs"]
        b = pd.read_parquet(tmp_path / "shared" / run.run_id / "predictions.parquet")["probs"]
        assert [list(x) for x in a] == [list(x) for x in b], run.arm


def test_a_feature_cache_that_cannot_be_written_is_only_a_cache(tmp_path, tiny_minilm_like, tiny_data, one_thread):
    store = tmp_path / "store"
    (store / ".cache").mkdir(parents=True)
    (store / ".cache" / "features").write_text("not a folder")  # every write into the cache fails
    study = write_study(tmp_path / "s.toml", tiny_minilm_like, tiny_data, "[[arms]]\nmethod = \"frozen\"\nlr = 1e-2\n",
                        seeds="[0, 1]")
    assert main(["run", str(study), "--store", str(store), "--no-report"]) == 0
    results = [json.loads(p.read_text()) for p in store.glob("*/result.json")]
    assert len(results) == 2 and all(r["status"] == "success" and not r["speed"]["frozen_features_shared"]
                                     for r in results)


def test_killed_study_resumes_without_redoing_finished_runs(tmp_path, tiny_study):
    """kill -9 in the middle of a study: finished runs stay, no half-written run is visible, resume completes."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "peftbench.cli", "run", str(tiny_study), "--store", str(store), "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 120
    while time.time() < deadline and len(Store(store).run_ids()) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {r: (store / r / "result.json").read_text() for r in Store(store).run_ids()}
    assert 2 <= len(finished) < 5
    for run_id in finished:  # every visible run folder is complete
        assert {"config.json", "result.json", "predictions.parquet", "metrics.jsonl"} <= {
            p.name for p in (store / run_id).iterdir()}
    assert main(["run", str(tiny_study), "--store", str(store), "--no-report"]) == 0
    assert len(Store(store).run_ids()) == 5
    for run_id, text in finished.items():  # finished runs were not redone
        assert (store / run_id / "result.json").read_text() == text
    assert not any((store / ".tmp").iterdir())
    ids = {r.run_id for r in expand_runs(load_study(tiny_study))}
    assert set(Store(store).run_ids()) == ids

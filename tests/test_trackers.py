"""Experiment trackers for real: a tiny study run with ``--report-to tensorboard,mlflow,wandb``, then each tool's own
files read back with its own library (TensorBoard's EventAccumulator, MlflowClient on the store's sqlite database,
wandb's offline run file parsed with wandb's protobuf records). Nothing reaches a network: wandb is offline, MLflow a
local sqlite file. Each test skips when its library is absent (``make setup`` installs them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from peftbench.cli import main
from peftbench.config import ConfigError, expand_runs, load_study
from peftbench.store import load_results
from peftbench.trackers import BACKENDS, RunTracking, check, epoch_metrics, final_metrics
from tests.conftest import write_study

ARMS = """
[[arms]]
method = "lora"
r = 2
lr = 3e-2

[[arms]]
method = "tfidf"
"""
INSTALLED = [name for name, cls in BACKENDS.items() if all(importlib.util.find_spec(m) for m in cls.requires)]


def _study(tmp_path: Path, model: Path, data: Path, extra: str = "") -> Path:
    path = write_study(tmp_path / "study.toml", model, data, ARMS, extra=extra)
    path.write_text(path.read_text().replace("epochs = 5", "epochs = 2"))
    return path


@pytest.fixture(scope="module")
def tracked_store(tmp_path_factory, tiny_bert, tiny_data):
    """A tiny study (a LoRA run of 2 epochs, a TF-IDF run) run once with every installed tracker."""
    if not INSTALLED:
        pytest.skip("no tracker library installed")
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("WANDB_DIR", raising=False)
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(tmp / var.lower()))
        store = tmp / "store"
        study = _study(tmp, tiny_bert, tiny_data)
        assert main(["run", str(study), "--store", str(store), "--no-report", "--report-to",
                     ",".join(INSTALLED)]) == 0
    runs = load_results(store).set_index("arm")
    results = {arm: json.loads((Path(row["path"]) / "result.json").read_text()) for arm, row in runs.iterrows()}
    epochs = [json.loads(line) for line in (Path(runs.loc["lora r=2", "path"]) / "metrics.jsonl").read_text()
              .splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    return store, results, epochs


def test_tensorboard_event_files_hold_the_curves_and_final_numbers(tracked_store):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store, results, epochs = tracked_store
    lora = results["lora r=2"]
    study_dir = store / ".tensorboard" / "tiny"
    (run_dir,) = [d for d in study_dir.iterdir() if d.name.endswith(lora["run_id"])]
    assert run_dir.name.startswith("lora_r=2_tiny-bert_tiny_lr=0.03_seed=0-")
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    scalars = acc.Tags()["scalars"]

    def series(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert series("validation/accuracy") == [(e["epoch"], pytest.approx(e["val_accuracy"])) for e in epochs]
    assert series("train/loss") == [(e["epoch"], pytest.approx(e["train_loss"])) for e in epochs]
    assert series("test/accuracy") == [(2, pytest.approx(lora["metrics"]["test"]["accuracy"]))]
    assert acc.Scalars("params/trainable")[0].value == lora["params"]["trainable"]
    assert acc.Scalars("costs/peak_memory_mb")[0].value == pytest.approx(lora["costs"]["peak_memory_mb"])
    assert {"costs/train_time_s", "params/total", "final_validation/f1_macro", "run/best_epoch"} <= set(scalars)
    assert "test/confusion_matrix" not in scalars
    # the baseline run: no epochs, its final numbers only
    (tfidf_dir,) = [d for d in study_dir.iterdir() if d.name.endswith(results["tfidf"]["run_id"])]
    tfidf = EventAccumulator(str(tfidf_dir))
    tfidf.Reload()
    assert "validation/accuracy" not in tfidf.Tags()["scalars"]
    assert tfidf.Scalars("test/accuracy")[0].value == pytest.approx(results["tfidf"]["metrics"]["test"]["accuracy"])


def test_mlflow_experiment_is_the_study_with_params_and_metric_history(tracked_store):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store, results, epochs = tracked_store
    client = MlflowClient(f"sqlite:///{(store / '.mlflow' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.data.tags["peftbench.run_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {res["run_id"] for res in results.values()}
    lora = results["lora r=2"]
    run = runs[lora["run_id"]]
    assert run.info.status == "FINISHED" and run.info.run_name == "lora r=2 | tiny-bert | tiny | lr=0.03 | seed=0"
    assert run.data.params["run_id"] == lora["run_id"] and run.data.params["method"] == "lora"
    assert json.loads(run.data.params["train.lr"]) == 0.03 and json.loads(run.data.params["method_params.r"]) == 2
    assert run.data.params["dataset.name"] == "tiny" and run.data.tags["peftbench.arm"] == "lora r=2"
    history = client.get_metric_history(run.info.run_id, "validation/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(e["epoch"], pytest.approx(e["val_accuracy"]))
                                                          for e in epochs]
    metrics = run.data.metrics
    assert metrics["test/accuracy"] == pytest.approx(lora["metrics"]["test"]["accuracy"])
    assert metrics["params/trainable"] == lora["params"]["trainable"]
    assert metrics["costs/train_time_s"] == pytest.approx(lora["costs"]["train_time_s"])
    assert runs[results["tfidf"]["run_id"]].data.metrics["test/f1_macro"] == pytest.approx(
        results["tfidf"]["metrics"]["test"]["f1_macro"])


def wandb_records(path: Path) -> list:
    """The records of a wandb run file (``run-ID.wandb``): a 7-byte header, then LevelDB log blocks of 32 KiB, each
    record a 7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_config_history_and_summary(tracked_store):
    pytest.importorskip("wandb")
    store, results, epochs = tracked_store
    files = sorted((store / ".wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    runs = {}
    for file in files:
        records = wandb_records(file)
        run = next(r.run for r in records if r.HasField("run"))
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.HasField("history")]
        summary = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for r in records
                   if r.HasField("summary") for i in r.summary.update}
        runs[config["run_id"]] = run, history, summary
    lora = results["lora r=2"]
    run, history, summary = runs[lora["run_id"]]
    assert run.project == "peftbench" and run.run_group == "tiny" and run.job_type == "lora r=2"
    assert run.display_name == "lora r=2 | tiny-bert | tiny | lr=0.03 | seed=0"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train.lr"] == 0.03 and config["method_params.r"] == 2 and config["seed"] == 0
    assert [(h["epoch"], h["validation/accuracy"]) for h in history] == [
        (e["epoch"], pytest.approx(e["val_accuracy"])) for e in epochs]
    assert summary["test/accuracy"] == pytest.approx(lora["metrics"]["test"]["accuracy"])
    assert summary["params/trainable"] == lora["params"]["trainable"] and summary["status"] == "success"
    _, tfidf_history, tfidf_summary = runs[results["tfidf"]["run_id"]]
    assert tfidf_history == [] and "test/accuracy" in tfidf_summary


def test_tracking_changes_no_run_id(tmp_path, tiny_bert, tiny_data):
    plain = _study(tmp_path, tiny_bert, tiny_data)
    ids = [r.run_id for r in expand_runs(load_study(plain))]
    tracked = load_study(plain, ['tracking.report_to=["tensorboard", "wandb"]', "tracking.wandb_project=p"])
    assert tracked.tracking == {"report_to": ["tensorboard", "wandb"], "wandb_project": "p"}
    assert [r.run_id for r in expand_runs(tracked)] == ids


def test_a_bad_report_to_is_refused(tmp_path, tiny_bert, tiny_data, capsys):
    study = _study(tmp_path, tiny_bert, tiny_data, extra='[tracking]\nreport_to = ["tensorboard", "neptune"]\n')
    assert main(["validate", str(study), "--no-data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tracking.report_to: expected some of tensorboard, mlflow, wandb, got 'neptune'" \
        in err
    with pytest.raises(SystemExit) as stop:  # the flag: argparse's usage error, exit 2
        main(["run", str(study), "--report-to", "neptune"])
    assert stop.value.code == 2 and "--report-to" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key 'report'"):
        load_study(study, ["tracking.report=1"])


def test_a_missing_library_says_what_to_install(tmp_path, tiny_bert, tiny_data, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"'wandb' needs the wandb library: pip install 'peftbench\[wandb\]'"):
        check({"report_to": ["wandb"]})
    study = _study(tmp_path, tiny_bert, tiny_data, extra='[tracking]\nreport_to = "wandb"\n')
    assert main(["validate", str(study), "--no-data"]) == 2
    assert "pip install 'peftbench[wandb]'" in capsys.readouterr().err


def test_a_failing_tracker_warns_and_the_run_is_stored(tmp_path, tiny_bert, tiny_data, capsys):
    pytest.importorskip("tensorboard")
    store = tmp_path / "store"
    store.mkdir()
    (store / ".tensorboard").write_text("a file where the log folder would go")
    study = _study(tmp_path, tiny_bert, tiny_data, extra='[tracking]\nreport_to = ["tensorboard"]\n')
    assert main(["run", str(study), "--store", str(store), "--no-report", "--set", "arms=[{method='tfidf'}]"]) == 0
    out = capsys.readouterr().out
    assert "warning: tensorboard tracking of tfidf" in out and "the run is stored as usual" in out
    assert (load_results(store)["status"] == "success").all()
    # and --report-to none turns the study's trackers off: no warning
    assert main(["run", str(study), "--store", str(tmp_path / "other"), "--no-report", "--report-to", "none",
                 "--set", "arms=[{method='tfidf'}]"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_ray_workers_log_to_the_trackers_too(tmp_path, tiny_bert, tiny_data):
    pytest.importorskip("ray")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "store"
    study = _study(tmp_path, tiny_bert, tiny_data, extra='[tracking]\nreport_to = ["tensorboard"]\n')
    assert main(["run", str(study), "--store", str(store), "--no-report", "--set", "arms=[{method='frozen'}]",
                 "--executor", "ray", "--cpus-per-run", "1"]) == 0
    (run_id,) = load_results(store)["run_id"]
    (run_dir,) = (store / ".tensorboard" / "tiny").iterdir()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert run_dir.name.endswith(run_id) and [e.step for e in acc.Scalars("validation/accuracy")] == [1, 2]


def test_final_numbers_keep_numbers_only_and_an_llm_arms_cost():
    result = {"metrics": {"test": {"accuracy": 0.5, "roc_auc": None, "confusion_matrix": [[1, 0], [0, 1]]},
                          "validation": None, "best_epoch": None, "epochs_run": 0},
              "params": {"trainable": 0, "total": 0},
              "costs": {"estimated_cost_usd": 0.25, "prompt_tokens": 120, "frozen_features_cached": False,
                        "peak_memory_kind": "process_peak_rss", "eval_time_s": float("nan")}}
    assert final_metrics(result) == {"test/accuracy": 0.5, "params/trainable": 0.0, "params/total": 0.0,
                                     "costs/estimated_cost_usd": 0.25, "costs/prompt_tokens": 120.0,
                                     "run/epochs_run": 0.0}
    assert epoch_metrics({"epoch": 1, "step": 9, "train_loss": 0.5, "val_f1_macro": 0.7, "lr": 1e-3}) == {
        "train/loss": 0.5, "validation/f1_macro": 0.7, "train/lr": 1e-3}


def test_a_failed_or_interrupted_run_closes_its_mlflow_run_so(tmp_path, tiny_bert, tiny_data, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")  # the user's own store
    run = expand_runs(load_study(_study(tmp_path, tiny_bert, tiny_data)))[0]
    settings = {"report_to": ["mlflow"]}
    with RunTracking(settings, run, tmp_path / "store") as tracking:
        tracking.log_epoch({"epoch": 1, "step": 3, "train_loss": 0.9})
        tracking.finish({"status": "failed", "error": "RuntimeError: boom"})
    with pytest.raises(KeyboardInterrupt), RunTracking(settings, run, tmp_path / "store"):
        raise KeyboardInterrupt
    assert not (tmp_path / "store" / ".mlflow").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    runs = {r.info.status: r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert sorted(runs) == ["FAILED", "KILLED"]
    assert runs["FAILED"].data.tags["peftbench.error"] == "RuntimeError: boom"
    assert runs["FAILED"].data.metrics == {"train/loss": 0.9} and runs["KILLED"].data.metrics == {}


def test_train_takes_report_to(tmp_path, tiny_bert, tiny_data):
    pytest.importorskip("tensorboard")
    store = tmp_path / "store"
    assert main(["train", "--model", str(tiny_bert), "--dataset", str(tiny_data), "--method", "tfidf",
                 "--store", str(store), "--no-report", "--report-to", "tensorboard"]) == 0
    (run_id,) = load_results(store)["run_id"]
    assert [d.name[-16:] for d in (store / ".tensorboard" / "train").iterdir()] == [run_id]

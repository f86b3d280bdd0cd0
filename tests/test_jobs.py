"""``peftbench run --jobs N``: runs of a study trained N at a time in worker processes store the same runs as one
after another (same ids, same predictions at the same thread count), record the thread share, and bad values stop
before anything runs. How much faster it is is measured in docs/benchmarks.md, not here."""

import json

import pandas as pd
import pytest

from peftbench.cli import main
from peftbench.store import Store
from tests.conftest import write_study

ARMS = """
[[arms]]
method = "majority"

[[arms]]
method = "lora"
r = [2, 4]
lr = 1e-2

[[arms]]
method = "full"
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def stored(store) -> dict:
    out = {}
    for result in Store(store).results():
        probs = [list(p) for p in pd.read_parquet(f"{result['path']}/predictions.parquet")["probs"]]
        out[result["run_id"]] = (result, probs)
    return out


def test_jobs_store_the_same_runs_as_one_after_another(tmp_path, tiny_bert, tiny_data, capsys):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS, seeds="[0, 1]")
    common = ["--no-report", "--set", "train.epochs=2", "--threads", "1"]
    assert main(["run", str(study), "--store", str(tmp_path / "one"), *common]) == 0
    assert main(["run", str(study), "--store", str(tmp_path / "two"), "--jobs", "2", *common]) == 0
    out = capsys.readouterr().out
    assert out.count("done   ") == 16  # 8 runs each time, each reported once
    one, two = stored(tmp_path / "one"), stored(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 8
    for run_id, (a, probs_a) in one.items():
        b, probs_b = two[run_id]
        assert a["status"] == b["status"] == "success"
        assert a["metrics"]["test"] == b["metrics"]["test"]  # one thread each way: bit-identical
        assert probs_a == probs_b
        if b["config"]["method"] != "majority":
            assert b["environment"]["threads"] == {"threads": 1, "why": "1 of 1 thread(s) for each of 2 jobs"}
    # a second run with jobs finds everything done and trains nothing
    assert main(["run", str(study), "--store", str(tmp_path / "two"), "--jobs", "2", *common]) == 0
    assert "0 trained now, 8 already done" in capsys.readouterr().out


def test_jobs_with_packs(tmp_path, tiny_bert, tiny_data):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS, seeds="[0, 1]")
    assert main(["run", str(study), "--store", str(tmp_path / "st"), "--no-report", "--set", "train.epochs=1",
                 "--set", "train.pack_runs=2", "--jobs", "2"]) == 0
    results = Store(tmp_path / "st").results()
    packed = [r for r in results if r["config"]["method"] == "lora"]
    assert len(results) == 8 and all(r["status"] == "success" for r in results)
    assert all(r["speed"]["packing"]["runs"] == 2 for r in packed)
    packs = {json.dumps(r["speed"]["packing"]["run_ids"]) for r in packed}
    assert len(packs) == 2  # 4 LoRA runs (2 ranks x 2 seeds) in 2 packs of 2


@pytest.mark.parametrize("flags, message", [
    (["--jobs", "0"], "--jobs: expected an integer >= 1 or auto, got 0"),
    (["--jobs", "many"], "--jobs: expected an integer >= 1 or auto, got 'many'"),
    (["--jobs", "2", "--executor", "ray"], "--jobs: only with the local executor"),
])
def test_bad_jobs_stop_before_anything_runs(tmp_path, tiny_bert, tiny_data, capsys, flags, message):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS)
    try:
        code = main(["run", str(study), "--store", str(tmp_path / "st"), "--no-report", *flags])
    except SystemExit as e:  # argparse's own error (exit 2)
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert Store(tmp_path / "st").run_ids() == []


def test_jobs_auto_is_one_one_thread_job_per_thread_as_memory_allows(tmp_path, tiny_bert, tiny_data, monkeypatch):
    from peftbench import cli

    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, "[[arms]]\nmethod = \"lora\"\nr = [2, 4]\n")
    common = ["--no-report", "--set", "train.epochs=1", "--threads", "2", "--jobs", "auto"]
    assert main(["run", str(study), "--store", str(tmp_path / "two"), *common]) == 0
    whys = {r["environment"]["threads"]["why"] for r in Store(tmp_path / "two").results()}
    assert whys == {"1 of 2 thread(s) for each of 2 jobs"}
    monkeypatch.setattr(cli, "AUTO_JOB_MEMORY", 2**60)  # no room for a second worker: one job, in this process
    assert main(["run", str(study), "--store", str(tmp_path / "one"), *common]) == 0
    assert {r["environment"]["threads"]["why"] for r in Store(tmp_path / "one").results()} == {"--threads"}


def _die_first_time(runs, root, *args):
    """A worker task whose process dies mid-run (its run's folder half-built) the first time it meets a group (a
    marker file per group in the store), then runs the group as usual: a worker killed for memory, say."""
    import hashlib
    import os
    from pathlib import Path

    from peftbench import executors

    marker = Path(root) / f".died-{hashlib.sha256(json.dumps(runs, sort_keys=True).encode()).hexdigest()[:12]}"
    if not marker.exists():
        from peftbench import runner

        marker.touch()
        runner._run_baseline = lambda *a, **k: os._exit(1)  # this process only: after the run's writer began
    return executors._run_group_in_worker(runs, root, *args)


def _always_die(runs, root, *args):
    import os

    os._exit(1)


BASELINES = "[[arms]]\nmethod = \"majority\"\n[[arms]]\nmethod = \"tfidf\"\n"


def test_a_dead_worker_s_groups_are_retried_in_a_fresh_pool(tmp_path, tiny_bert, tiny_data, monkeypatch, capsys):
    from peftbench import executors

    monkeypatch.setattr(executors, "WORKER_TASK", _die_first_time)
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, BASELINES)
    assert main(["run", str(study), "--store", str(tmp_path / "st"), "--jobs", "2", "--no-report"]) == 0
    results = Store(tmp_path / "st").results()
    assert len(results) == 2 and all(r["status"] == "success" for r in results)
    assert len(list((tmp_path / "st").glob(".died-*"))) == 2  # each group's worker died once, then it was trained
    assert not any((tmp_path / "st" / ".tmp").glob("*"))  # the dead workers' half-built folders were cleaned


def test_a_group_whose_worker_always_dies_is_stored_as_failed(tmp_path, tiny_bert, tiny_data, monkeypatch):
    from peftbench import executors

    monkeypatch.setattr(executors, "WORKER_TASK", _always_die)
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, BASELINES)
    assert main(["run", str(study), "--store", str(tmp_path / "st"), "--jobs", "2", "--no-report"]) == 1
    results = Store(tmp_path / "st").results()
    assert len(results) == 2 and all(r["status"] == "failed" for r in results)
    assert all(r["error"] == f"a worker process died while it ran, on each of {executors.WORKER_RETRIES + 1} "
               "attempts" for r in results)

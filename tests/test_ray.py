"""The Ray executor on a local 2-CPU Ray instance: a worker killed mid-run is retried (or, out of retries, its run is
stored as failed and the study resumes), and the final store equals the local executor's, run for run."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402

from peftbench.config import expand_runs, load_study  # noqa: E402
from peftbench.executors import run_ray  # noqa: E402
from peftbench.executors import run_study  # noqa: E402
from peftbench.store import HOST, Store  # noqa: E402
from tests.conftest import TINY_ARMS, write_study  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_minilm_like, tiny_data):
    folder = tmp_path_factory.mktemp("ray-study")
    return load_study(write_study(folder / "study.toml", tiny_minilm_like, tiny_data, TINY_ARMS))


def one_thread_local(study, store) -> None:
    """The local executor at the thread count the Ray tasks use (cpus_per_run=1): metrics match only then."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(study, store)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_store(study, tmp_path_factory):
    store = tmp_path_factory.mktemp("local") / "store"
    one_thread_local(study, store)
    return store


class KillOneWorker(threading.Thread):
    """Waits until a worker has trained the first of the 5 epochs of a LoRA or full run, then kill -9s it, once.
    (Its building folder ``.tmp/<run_id>-<pid>@<host>`` names the worker; the run is far from done.)"""

    def __init__(self, store: Path):
        super().__init__(daemon=True)
        self.store, self.killed, self.stop = store, None, threading.Event()

    def run(self):
        while not self.stop.wait(0.02):
            for d in (self.store / ".tmp").glob(f"*@{HOST}"):
                try:
                    method = json.loads((d / "config.json").read_text())["method"]
                    epochs = len((d / "metrics.jsonl").read_text().splitlines())
                except (OSError, ValueError):
                    continue
                if method in ("lora", "full") and epochs == 1:
                    run_id, pid = d.name.partition("@")[0].rsplit("-", 1)
                    self.killed = (run_id, int(pid))
                    os.kill(int(pid), signal.SIGKILL)
                    return


def kill_one_worker_during(store: Path, fn):
    killer = KillOneWorker(store)
    killer.start()
    try:
        summary = fn()
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no worker was killed: the runs finished too fast to catch one mid-run"
    return summary, killer.killed


def results(store: Path) -> dict[str, dict]:
    return {r["run_id"]: r for r in Store(store).results()}


def assert_same_store(a: Path, b: Path) -> None:
    ra, rb = results(a), results(b)
    assert sorted(ra) == sorted(rb)
    for run_id in ra:
        assert ra[run_id]["status"] == rb[run_id]["status"] == "success"
        assert ra[run_id]["config"] == rb[run_id]["config"]
        assert ra[run_id]["metrics"] == rb[run_id]["metrics"], ra[run_id]["config"]["arm"]
        for name in ("config.json", "result.json", "metrics.jsonl", "predictions.parquet"):
            assert (a / run_id / name).is_file() and (b / run_id / name).is_file()


def assert_clean(store: Path) -> None:
    assert not list((store / ".tmp").iterdir()), "half-built folders left behind"
    assert not list((store / ".claims").iterdir()), "claims left behind"


def test_killed_worker_is_retried_and_the_store_equals_the_local_one(local_ray, study, local_store, tmp_path):
    store = tmp_path / "store"
    summary, (killed_run, killed_pid) = kill_one_worker_during(
        store, lambda: run_ray(study, store, cpus_per_run=1, max_retries=2, poll_s=0.2))
    assert summary.done == 5 and not summary.failed and not summary.claimed
    assert_same_store(store, local_store)
    assert results(store)[killed_run]["status"] == "success"
    assert_clean(store)
    assert {r.run_id for r in expand_runs(study)} == set(Store(store).run_ids())


def test_out_of_retries_the_run_is_failed_and_the_study_resumes(local_ray, study, local_store, tmp_path, capsys):
    store = tmp_path / "store"
    summary, (killed_run, _) = kill_one_worker_during(
        store, lambda: run_ray(study, store, cpus_per_run=1, max_retries=0, poll_s=0.2))
    assert summary.failed == [killed_run] and summary.done == 5
    stored = results(store)
    assert stored[killed_run]["status"] == "failed"
    assert "worker died on each of 1 attempts" in stored[killed_run]["error"]
    assert json.loads((store / killed_run / "config.json").read_text()) == stored[killed_run]["config"]
    assert all(r["status"] == "success" for run_id, r in stored.items() if run_id != killed_run)
    assert "FAILED" in capsys.readouterr().out
    assert_clean(store)

    # resume with the other executor: only the failed run is trained, and the store is the local one
    finished = {run_id: (store / run_id / "result.json").read_text() for run_id in stored if run_id != killed_run}
    one_thread_local(study, store)
    assert_same_store(store, local_store)
    for run_id, text in finished.items():
        assert (store / run_id / "result.json").read_text() == text
    assert_clean(store)


def test_cli_runs_a_study_on_ray_and_the_local_executor_resumes_it(local_ray, tmp_path, tiny_bert, tiny_data,
                                                                     capsys):
    from peftbench.cli import main

    arms = "[[arms]]\nmethod = \"untrained\"\n[[arms]]\nmethod = \"frozen\"\nlr = 1e-1\n"
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, arms, seeds="[0, 1]")
    store = tmp_path / "store"
    args = ["run", str(study), "--store", str(store), "--no-report"]
    assert main(args + ["--executor", "ray", "--cpus-per-run", "1", "--max-retries", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 runs (4 trained now, 0 already done)" in out and out.count("done   ") == 4
    assert main(args) == 0
    assert "4 runs (0 trained now, 4 already done)" in capsys.readouterr().out
    assert_clean(store)


def test_until_decided_runs_its_added_seeds_on_ray(local_ray, tmp_path, tiny_bert, tiny_data, capsys):
    """--until-decided with the Ray executor: the added seeds are Ray tasks into the same store, and the record of
    the looks lists every run it used."""
    from peftbench.cli import main
    from peftbench.store import Store, load_results

    arms = "[[arms]]\nmethod = \"majority\"\n[[arms]]\nmethod = \"frozen\"\nlr = 1e-1\n[[arms]]\nmethod = \"full\"\n"
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, arms, seeds="[0, 1]")
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store), "--no-report", "--executor", "ray", "--cpus-per-run", "1",
                 "--until-decided", "--max-seeds", "4"]) == 0
    assert "look 1/2" in capsys.readouterr().out
    record = Store(store).read_sequential("tiny")
    df = load_results(store)
    assert sorted(record["run_ids"]) == sorted(df["run_id"]) and (df["status"] == "success").all()
    assert len(record["looks"]) == 2  # 60 test examples: frozen vs full stays undecided at look 1
    assert sorted(set(df.loc[df["arm"] == "full", "seed"])) == [0, 1, 2, 3]  # the added seeds ran as Ray tasks
    assert sorted(set(df.loc[df["arm"] == "majority", "seed"])) == [0, 1]  # decided at look 1: no more seeds
    assert_clean(store)

"""Run claims: two runners on one store never run the same run twice; a dead runner's claim is taken over."""

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftbench.config import expand_runs, load_study
from peftbench.executors import run_study
from peftbench.store import CLAIM_TIMEOUT_S, HOST, Store, load_results, write_json
from tests.conftest import write_study

RUN = "0123456789abcdef"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_claimer_wins_and_release_frees_the_run(tmp_path):
    store = Store(tmp_path)
    assert store.claim(RUN, "a")
    assert not store.claim(RUN, "b")
    assert store.claimed(RUN)
    info = store.claim_info(RUN)
    assert info["owner"] == "a" and info["pid"] == os.getpid() and info["host"] == HOST
    assert store.claim(RUN, "a"), "the same owner (a retried task) gets its claim back"
    store.release(RUN, "b")  # not b's: nothing happens
    assert store.claim_info(RUN)["owner"] == "a"
    store.release(RUN, "a")
    assert not store.claimed(RUN)
    assert store.claim(RUN, "b")


def _race(root: str, owner: str, barrier) -> bool:
    barrier.wait()
    return Store(root).claim(RUN, owner)


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_concurrent_claimers_exactly_one_wins(tmp_path, stale):
    """Processes racing for a free claim, or for one left by a dead process: exactly one gets it."""
    if stale:
        Store(tmp_path).claim_path(RUN).parent.mkdir(parents=True)
        write_json(Store(tmp_path).claim_path(RUN), {"owner": "dead", "pid": dead_pid(), "host": HOST, "time": "x"})
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        wins = pool.starmap(_race, [(str(tmp_path), f"owner{i}", barrier) for i in range(n)])
    assert sum(wins) == 1
    assert Store(tmp_path).claim_info(RUN)["owner"] == f"owner{wins.index(True)}"
    assert not list((tmp_path / ".claims").glob("*.break"))


def test_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    store = Store(tmp_path)
    store.claim_path(RUN).parent.mkdir(parents=True)
    write_json(store.claim_path(RUN), {"owner": "crashed", "pid": dead_pid(), "host": HOST, "time": "x"})
    assert not store.claimed(RUN)
    assert store.claim(RUN, "new")
    assert store.claim_info(RUN)["owner"] == "new"


def test_claim_of_another_host_is_stale_only_after_the_heartbeat_timeout(tmp_path):
    store = Store(tmp_path)
    store.claim_path(RUN).parent.mkdir(parents=True)
    write_json(store.claim_path(RUN), {"owner": "remote", "pid": 1, "host": "elsewhere", "time": "x"})
    assert store.claimed(RUN) and not store.claim(RUN, "new")  # pid 1 here says nothing about the other host
    store.heartbeat(RUN, "new")  # not its claim: no touch
    old = time.time() - CLAIM_TIMEOUT_S - 5
    os.utime(store.claim_path(RUN), (old, old))
    assert not store.claimed(RUN)
    store.heartbeat(RUN, "remote")  # the owner's heartbeat makes it live again
    assert store.claimed(RUN)
    os.utime(store.claim_path(RUN), (old, old))
    assert store.claim(RUN, "new")


def test_a_claim_being_written_is_not_taken(tmp_path):
    store = Store(tmp_path)
    store.claim_path(RUN).parent.mkdir(parents=True)
    store.claim_path(RUN).write_text("")  # created with O_EXCL, content not written yet
    assert store.claimed(RUN) and not store.claim(RUN, "new")


def test_clean_stale_keeps_other_hosts_building_folders_until_unclaimed_and_old(tmp_path):
    store = Store(tmp_path)
    mine_dead = tmp_path / ".tmp" / f"{RUN}-{dead_pid()}@{HOST}"
    legacy_dead = tmp_path / ".tmp" / f"{RUN}-{dead_pid()}"
    remote = tmp_path / ".tmp" / f"{RUN}-1@elsewhere"
    for d in (mine_dead, legacy_dead, remote):
        d.mkdir(parents=True)
    store.clean_stale()
    assert not mine_dead.exists() and not legacy_dead.exists()
    assert remote.exists(), "another host's run in progress: its pid cannot be checked from here"
    old = time.time() - CLAIM_TIMEOUT_S - 5
    os.utime(remote, (old, old))
    assert store.claim(RUN, "remote-runner")
    store.clean_stale()
    assert remote.exists(), "still claimed"
    store.release(RUN, "remote-runner")
    store.clean_stale()
    assert not remote.exists()


ARMS = "[[arms]]\nmethod = \"untrained\"\n[[arms]]\nmethod = \"frozen\"\nlr = 1e-1\n"


def test_local_runner_leaves_a_run_claimed_by_a_live_runner(tmp_path, tiny_bert, tiny_data):
    study = load_study(write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS))
    held, other = (r.run_id for r in expand_runs(study))
    store = Store(tmp_path / "store")
    assert store.claim(held, "another-runner")
    summary = run_study(study, store.root)
    assert summary.claimed == [held] and summary.done == 1
    assert Store(store.root).run_ids() == [other]
    assert store.claim_info(held)["owner"] == "another-runner", "not touched"
    store.release(held, "another-runner")
    summary = run_study(study, store.root)
    assert summary.done == 1 and summary.skipped == 1 and not summary.claimed
    assert sorted(Store(store.root).run_ids()) == sorted([held, other])
    assert not list((store.root / ".claims").iterdir())


def test_two_local_runners_on_one_study_run_each_run_once(tmp_path, tiny_bert, tiny_data):
    arms = ARMS + "[[arms]]\nmethod = \"lora\"\nr = [2, 4]\nlr = 3e-2\n"
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, arms, extra="", seeds="[0]")
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "peftbench.cli", "run", str(study), "--store", str(store), "--no-report",
           "--set", "train.epochs=2"]
    cwd = Path(__file__).resolve().parents[1]
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the local executor must not import ray')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # two runners on two cores: no thread oversubscription
           "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    trained = [int(out.split(" trained now")[0].rsplit("(", 1)[-1]) for out in outs]
    assert sum(trained) == 4, outs  # each of the 4 runs trained by exactly one of the two runners
    df = load_results(store)
    assert len(df) == 4 and (df["status"] == "success").all()
    assert not list((store / ".claims").iterdir()) and not list((store / ".tmp").iterdir())

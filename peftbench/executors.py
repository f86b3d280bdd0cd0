"""Where runs execute: here, one after another or ``jobs`` at a time (:func:`run_study`), or as Ray tasks across GPUs
and machines.

Both executors plan the study the same way (:func:`plan_runs`), count what comes back the same way
(:func:`account_result`) and go through :func:`execute_claimed_group`, so the store stays the single source of truth:
a run is trained only by the runner holding its claim (``STORE/.claims/<run_id>``), its folder appears atomically
when it is finished, and a study resumes correctly whichever executor ran what. Ray is imported only by
:func:`run_ray`.

Example::

    >>> from peftbench.config import load_study
    >>> from peftbench.executors import run_ray, run_study
    >>> summary = run_study(load_study("studies/demo.toml"), store="runs")                   # doctest: +SKIP
    >>> summary = run_ray(load_study("studies/demo.toml"), address="auto", gpus_per_run=1)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftbench import methods, packing, progress, trackers
from peftbench.config import ConfigError, RunConfig, Study, expand_runs
from peftbench.environment import environment_base, pick_device
from peftbench.runner import execute_runs, get_splits
from peftbench.store import HEARTBEAT_S, HOST, Store


@dataclass
class StudySummary:
    """What a study run did: its run ids, how many were trained now, skipped (already stored), failed, or left to
    another runner."""

    store: Path
    run_ids: list[str]
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)  # left to another runner that held them when their turn came


def expected_work(run: RunConfig) -> float:
    """A run's weight in the study's ETA: examples it will push through the encoder, a training pass counting as
    three forward passes (forward + backward)."""
    try:
        info = get_splits(run.dataset).info
    except Exception:  # noqa: BLE001 - the run itself will report the problem
        return 1.0
    n_train, n_val, n_test = (info.get(f"n_{role}", 0) for role in ("train", "validation", "test"))
    if methods.is_baseline(run.method):
        return float(max(n_test, 1))
    if methods.uses_frozen_encoder(run.method) and run.train.get("cache_frozen_features", True):
        return float(max(n_train + n_val + n_test, 1))  # the encoder runs once per example
    epochs = run.train.get("epochs", 0) if methods.METHODS[run.method].trains else 0
    return float(max(epochs * (3 * n_train + n_val) + n_val + n_test, 1))


def plan_runs(study: Study, store: Store, retry_failed: bool = True,
              runs: list[RunConfig] | None = None) -> tuple["StudySummary", list[RunConfig]]:
    """Open the store (removing half-built folders of dead runners) and split the study's runs (or ``runs``, a subset
    such as the seeds ``--until-decided`` adds) into those already done (counted in the summary) and those to run
    (unique by run id)."""
    if runs is None and study.search:  # expand_runs leaves the searched arms out: their runs come from the search
        raise ConfigError(f"{study.path or 'study'}: search: a study with a search runs through "
                          f"peftbench.search.run_search (or peftbench run), not the executors alone")
    store.open()
    runs = expand_runs(study) if runs is None else runs
    summary = StudySummary(store=store.root, run_ids=[r.run_id for r in runs])
    todo = []
    for run in {r.run_id: r for r in runs}.values():  # two identical arms are one run
        status = store.status(run.run_id)
        if status == "success" or (status == "failed" and not retry_failed):
            summary.skipped += 1
            if status == "failed":
                summary.failed.append(run.run_id)
        else:
            todo.append(run)
    return summary, todo


def account_result(summary: "StudySummary", run: RunConfig, result: dict[str, Any] | None, store: Store,
                   tail: str = "") -> None:
    """Count one returned run in ``summary`` and print one line about it (both executors). ``result`` None: another
    runner holds the run, or finished it since we looked. ``tail`` ends the line of a finished run (the study ETA)."""
    if result is None:
        if store.status(run.run_id) is None:
            summary.claimed.append(run.run_id)
            holder = (store.claim_info(run.run_id) or {}).get("owner")
            progress.say(f"skip   {run.label}: held by another runner" + (f" ({holder})" if holder else ""))
        else:
            summary.skipped += 1
            if store.status(run.run_id) == "failed":
                summary.failed.append(run.run_id)
        return
    summary.done += 1
    if result["status"] == "failed":
        summary.failed.append(run.run_id)
        progress.say(f"FAILED {run.label}: {result['error']}")
        return
    costs = result.get("costs") or {}
    speed = costs.get("train_examples_per_s")
    progress.say(f"done   {run.label}: test acc {result['metrics']['test']['accuracy']:.4f}, "
               f"{costs.get('train_time_s', 0):.1f}s train" + (f", {speed:.0f} ex/s" if speed else "") + tail)


def run_study(study: Study, store: str | Path | None = None, device: str = "auto",
              retry_failed: bool = True, runs: list[RunConfig] | None = None, jobs: int = 1) -> StudySummary:
    """Run every unfinished run of ``study`` into ``store`` (default: the study's ``store``): one after another in
    this process, or ``jobs`` at a time in as many worker processes, each with an equal share of this process's torch
    threads (on 2 CPU cores, two 1-thread runs at once train 1.5× the examples per second of one 2-thread run:
    docs/benchmarks.md). Packs of runs (``train.pack_runs``) are one unit of work.

    A finished (successful) run is skipped; a failed one is tried again unless ``retry_failed`` is False. A run whose
    claim another live runner holds (another ``peftbench run`` on the same store) is left to it. ``runs``: only these
    runs of the study (default: all of them).
    """
    store_obj = Store(store or study.store)
    trackers.check(study.tracking)
    summary, todo = plan_runs(study, store_obj, retry_failed, runs)
    dev = pick_device(device)
    owner = new_owner("local")
    seen = {run.run_id: store_obj.stamp(run.run_id) for run in todo}
    # The study bar counts expected work (examples through the encoder), so its ETA weighs a 3-epoch full fine-tuning
    # run more than a frozen-encoder one; each finished run also prints the ETA measured so far.
    work = {run.run_id: expected_work(run) for run in todo}
    total_work, done_work, started = sum(work.values()), 0.0, time.perf_counter()
    bar = progress.bar(total=round(total_work), desc=f"study {study.name}", position=0, unit="ex", unit_scale=True)
    groups = packing.plan(todo)  # runs one at a time, or packs of runs trained together (train.pack_runs)
    if jobs > 1 and len(groups) > 1:
        done = _in_workers(groups, store_obj, dev, owner, seen, study.tracking, jobs, work)
    else:
        done = ((group, execute_claimed_group(group, store_obj, dev, owner, [seen[run.run_id] for run in group],
                                              tracking=study.tracking)) for group in groups)
    i = 0
    bar.set_postfix_str(f"run 1/{len(todo)}: {groups[0][0].arm}" if groups else "")
    for group, results in done:
        for run, result in zip(group, results):
            i += 1
            bar.set_postfix_str(f"run {i}/{len(todo)}: {run.arm}")
            bar.update(round(work[run.run_id]))
            done_work += work[run.run_id]
            left = progress.eta(time.perf_counter() - started, done_work, total_work)
            account_result(summary, run, result, store_obj, f" ({i}/{len(todo)}; study ETA {left})" if left else
                           f" ({i}/{len(todo)})")
    bar.close()
    return summary


WORKER_RETRIES = 2  # times a group is retried when a worker process dies while holding it


def _in_workers(groups: list[list[RunConfig]], store: Store, device, owner: str, seen: dict[str, Any],
                tracking: dict[str, Any] | None, jobs: int, work: dict[str, float]):
    """Yield (group, results) as ``jobs`` worker processes (spawned: a fresh interpreter, no forked OpenMP state)
    finish the groups, longest expected work (``work``, by run id) first. Each worker uses ``torch threads // jobs``
    threads (at least 1). When a worker dies (e.g. killed for memory) the pool breaks: the unfinished groups go to a new pool, the ones that
    were running (the first ``jobs`` unfinished, as the pool starts them in order) charged one attempt; a group
    charged more than ``WORKER_RETRIES`` times is stored as failed (:func:`record_lost_run`). Ctrl-C stops the
    workers at once (their runs are not stored, their claims go stale)."""
    import concurrent.futures as cf
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    why = f"{threads} of {torch.get_num_threads()} thread(s) for each of {jobs} jobs"
    pending = sorted(range(len(groups)), key=lambda g: -sum(work[r.run_id] for r in groups[g]))
    attempts = dict.fromkeys(pending, 0)

    def lost(g: int, error: str) -> list[dict[str, Any] | None]:
        return [record_lost_run(run, store, owner, seen[run.run_id], error) for run in groups[g]]

    while pending:
        broken = False
        pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_ignore_interrupts)
        try:
            futures = {pool.submit(WORKER_TASK, [r.to_dict() for r in groups[g]], str(store.root),
                                   str(device), owner, [seen[r.run_id] for r in groups[g]], threads, tracking,
                                   why): g for g in pending}
            for future in cf.as_completed(futures):
                g = futures[future]
                try:
                    results = future.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                except Exception as e:  # noqa: BLE001 - a bug escaped the worker's task
                    results = lost(g, f"worker failed ({_one_line(e)})")
                pending.remove(g)
                yield groups[g], results
        except BaseException:  # Ctrl-C (or a bug here): stop the workers now instead of letting them finish their runs
            workers = list((getattr(pool, "_processes", None) or {}).values())
            for process in workers:
                process.terminate()
            for process in workers:
                process.join(timeout=10)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            store.clean_stale()  # the half-built folders of stopped or dead workers (their claims are stale too)
        if broken:
            for g in pending[:jobs]:
                attempts[g] += 1
            for g in [g for g in pending if attempts[g] > WORKER_RETRIES]:
                pending.remove(g)
                yield groups[g], lost(g, f"a worker process died while it ran, on each of {WORKER_RETRIES + 1} "
                                            f"attempts")


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the main process, which stops them (their runs are then simply not stored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_group_in_worker(runs: list[dict[str, Any]], root: str, device: str, owner: str, seen: list[Any],
                         threads: int, tracking: dict[str, Any] | None, why: str) -> list[dict[str, Any] | None]:
    """A local worker process's task: a group of runs (one run, or a pack) into the store."""
    import torch

    from peftbench.environment import THREADS

    torch.set_num_threads(threads)
    THREADS.update(threads=threads, why=why)
    progress.BARS = False  # one line per epoch: bars of several processes would overwrite each other
    progress.quiet_libraries()
    return execute_claimed_group([RunConfig.from_dict(r) for r in runs], Store(root), pick_device(device), owner,
                                 seen, tracking=tracking)


WORKER_TASK = _run_group_in_worker  # what a worker process runs per group (a test swaps in one that dies)


def new_owner(kind: str) -> str:
    """A claim owner token, unique to one runner (one ``peftbench run``): every task it submits claims with it."""
    return f"{kind}:{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextmanager
def heartbeat(store: Store, run_id: str, owner: str, every_s: float = HEARTBEAT_S):
    """Touch the run's claim every ``every_s`` seconds while the block runs, so other runners see it is alive."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            store.heartbeat(run_id, owner)

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{run_id}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def holding(store: Store, run_id: str, owner: str, seen: Any):
    """Yields True when this runner may write the run: it got the run's claim, and the run's ``result.json`` is as it
    was when we planned (``seen`` is ``store.stamp(run_id)`` then), i.e. no other runner finished it meanwhile.
    A claim taken is released on leaving the block."""
    if not store.claim(run_id, owner):
        yield False
        return
    try:
        yield store.stamp(run_id) == seen
    finally:
        store.release(run_id, owner)


def execute_claimed_group(runs: list[RunConfig], store: Store, device, owner: str, seen: list[Any],
                          position: int = 1, tracking: dict[str, Any] | None = None) -> list[dict[str, Any] | None]:
    """:func:`~peftbench.runner.execute_runs` of ``runs`` (one run, or a pack trained together:
    :mod:`peftbench.packing`), each under its own claim, heartbeat and trackers. A run not ours to run (another live
    runner holds it, or finished it since we planned: see :func:`holding`) is left out, its result None.
    ``tracking``: the study's ``[tracking]`` (the experiment trackers each run is also logged to, once its files are
    written)."""
    out: list[dict[str, Any] | None] = [None] * len(runs)
    with contextlib.ExitStack() as stack:
        ours = [i for i, run in enumerate(runs) if stack.enter_context(holding(store, run.run_id, owner, seen[i]))]
        if not ours:
            return out
        tracked = []
        for i in ours:
            stack.enter_context(heartbeat(store, runs[i].run_id, owner))
            tracked.append(stack.enter_context(trackers.RunTracking(tracking, runs[i], store.root)))
        results = execute_runs([runs[i] for i in ours], store, device, position, [t.log_epoch for t in tracked])
        for i, t, result in zip(ours, tracked, results):
            t.finish(result)
            out[i] = result
    return out


def record_lost_run(run: RunConfig, store: Store, owner: str, seen: Any, error: str) -> dict[str, Any] | None:
    """Store a failed result for a run whose worker died on every attempt (so ``ls`` and reports show it).
    Nothing is written (None) when another runner has taken the run over or finished it."""
    with holding(store, run.run_id, owner, seen) as ours:
        if not ours:
            return None
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return store.writer(run.run_id, run.to_dict()).fail(
            error, environment={**environment_base(), "device": None}, timing={"started": None, "finished": now})


def _run_in_worker(run: dict[str, Any], root: str, device: str, owner: str, seen: Any,
                   threads: int, tracking: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The Ray task: one run into the shared store, in a worker process (metrics match the local executor's only at
    the same thread count)."""
    return _run_group_in_worker([run], root, device, owner, [seen], threads, tracking,
                                f"--cpus-per-run: {threads} thread(s)")[0]


def run_ray(study: Study, store: str | Path | None = None, device: str = "auto", retry_failed: bool = True,
            address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0, max_retries: int = 2,
            torch_threads: int | None = None, poll_s: float = 2.0,
            runs: list[RunConfig] | None = None) -> StudySummary:
    """Run every unfinished run of ``study`` as a Ray task; the store (default: the study's) must be reachable at the
    same path from every worker (a local folder on one machine, a shared filesystem across machines).

    ``address``: None connects to the cluster in ``RAY_ADDRESS`` or started by ``ray start`` on this machine, else
    starts a local one; ``"auto"`` or ``"ray://host:10001"`` connect to a running cluster. If Ray is already initialised
    it is used as it is. Each task reserves ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (a fraction shares a GPU),
    sets torch to ``torch_threads`` threads (default: ``cpus_per_run``) and is retried up to ``max_retries`` times when
    its worker dies; after that the run is stored as failed and the rest of the study goes on. ``runs``: only these
    runs of the study (default: all of them).

    Example::

        >>> run_ray(load_study("studies/demo.toml"), "/nfs/runs", address="auto", gpus_per_run=1)  # doctest: +SKIP
    """
    import ray

    store_obj = Store(Path(store or study.store).resolve())  # workers may start elsewhere: an absolute path
    trackers.check(study.tracking)
    summary, todo = plan_runs(study, store_obj, retry_failed, runs)
    if not todo:
        return summary
    if gpus_per_run == 0 and device == "auto":
        device = "cpu"  # Ray hides no GPU from a task that reserved none: do not share one behind its back
    threads = torch_threads or max(1, int(cpus_per_run))

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address)
    # progress bars of the workers would be forwarded to this terminal line by line: the driver shows one for the study
    quiet = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    task = ray.remote(_run_in_worker).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries,
                                              retry_exceptions=False, runtime_env={"env_vars": quiet})
    owner = new_owner("ray")
    seen = {run.run_id: store_obj.stamp(run.run_id) for run in todo}
    pending = {task.remote(run.to_dict(), str(store_obj.root), device, owner, seen[run.run_id], threads,
                           study.tracking): run for run in todo}
    bar = progress.bar(total=len(todo), desc=f"study {study.name} (ray)", unit="run")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
            for ref in ready:
                run = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # an exception escaped execute_run: a bug, or a broken node
                    result = record_lost_run(run, store_obj, owner, seen[run.run_id], _one_line(e.cause or e))
                except ray.exceptions.RayError as e:  # the worker (or its node) died on every attempt
                    error = f"worker died on each of {max_retries + 1} attempts ({_one_line(e)})"
                    result = record_lost_run(run, store_obj, owner, seen[run.run_id], error)
                account_result(summary, run, result, store_obj)
                bar.update(1)
            claims = store_obj.claims()
            running = sum(claims.get(r.run_id, {}).get("owner") == owner for r in pending.values())
            bar.set_postfix(running=running, failed=len(summary.failed), elsewhere=len(summary.claimed))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        store_obj.clean_stale()  # folders of workers killed on this host
        if started_here:
            ray.shutdown()
    return summary


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"

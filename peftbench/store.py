"""The run store: one folder per run, named by the run id, written atomically; results as a DataFrame.

A run is built in ``STORE/.tmp/<run_id>-<pid>@<host>/`` and renamed to ``STORE/<run_id>/`` when it is complete, so a
crash (Ctrl-C, kill -9) never leaves a half-written run behind and a finished run is never redone. This module is the
only writer of run folders: a run is written through a :class:`RunWriter` (``store.writer(run_id, config)``), whose
methods name every file a run folder holds (``tests/test_writer.py`` checks that no other module writes one).

Several runners (local or Ray workers, on one machine or on several sharing the store folder) may work on one store:
a runner first takes the run's claim file ``STORE/.claims/<run_id>`` (created with ``O_CREAT|O_EXCL``, so exactly one
runner gets it), touches it while it runs, and removes it when done. A claim whose owner died is stale and taken over:
on the same host as soon as its pid is gone, from any host once it has not been touched for ``CLAIM_TIMEOUT_S``.

Example::

    >>> from peftbench.store import load_results
    >>> df = load_results("runs")        # doctest: +SKIP
    >>> df.groupby("arm")["test_accuracy"].mean()  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from peftbench.evaluate import METRICS as METRICS_STORED

RESULT = "result.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.parquet"
SPECTRUM = "spectrum.json"
CLAIMS = ".claims"
SEQUENTIAL = ".sequential"
SEARCH = ".search"  # STORE/.search/<study>/: hyperparameter searches
HEARTBEAT_S = 30.0  # how often a running run touches its claim
CLAIM_TIMEOUT_S = 300.0  # a claim untouched for this long is stale, whatever host holds it
HOST = socket.gethostname()


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON atomically (temp file in the same folder + rename); ``indent`` None: one line, no newline."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=_jsonable) + ("\n" if indent is not None else ""))
    os.replace(tmp, path)


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically (temp file named by process and host in the same folder + rename; the temp file
    removed if writing fails, whose error is raised): the store's caches of token ids and frozen-encoder outputs."""
    import torch

    tmp = Path(path).with_suffix(f".{os.getpid()}-{HOST}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


class Store:
    """A folder of run folders. Only this module writes into it (a run through its :class:`RunWriter`), besides the
    caches under ``.cache/`` (tokens, LLM replies) and the report writer (``report/``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def check_writable(self) -> None:
        """ConfigError (one line) unless runs can be written here: the store path is a file, lies under a file, or
        its folder (or the nearest existing parent) is read-only. Leaves nothing behind."""
        import tempfile

        from peftbench.config import ConfigError

        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root}: the store path is a file, not a folder (choose another --store)")
        existing = next(p for p in [self.root, *self.root.absolute().parents] if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{self.root}: cannot create the store folder: {existing} is a file")
        try:
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".peftbench-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"{self.root}: the store folder {existing} is not writable ({e.strerror})") from None

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    def status(self, run_id: str) -> str | None:
        """``success``, ``failed`` or None (never run, or no complete folder)."""
        result = read_result(self.run_dir(run_id))
        return result.get("status") if result else None

    def writer(self, run_id: str, config: dict[str, Any]) -> "RunWriter":
        """A :class:`RunWriter` for a new attempt at the run: its private folder, with ``config.json`` written."""
        return RunWriter(self, run_id, config)

    def begin(self, run_id: str) -> Path:
        """A fresh private folder to build the run in (named by pid and host: the store may be shared by hosts)."""
        tmp = self.root / ".tmp" / f"{run_id}-{os.getpid()}@{HOST}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, run_id: str, tmp: Path) -> Path:
        """Move a complete run folder into place. A failed run of the same id is replaced; a successful one is never
        overwritten (the new folder is discarded)."""
        final = self.run_dir(run_id)
        if final.exists():
            if self.status(run_id) == "success":
                shutil.rmtree(tmp)
                return final
            replace_folder(tmp, final, self.root / ".tmp" / f"{run_id}-replaced-{os.getpid()}@{HOST}")
            return final
        os.replace(tmp, final)
        return final

    def rename_run(self, old_id: str, new_id: str, config: dict[str, Any]) -> None:
        """Move a stored run to another id (a store migration): its ``config.json`` and ``result.json`` get ``config``
        and ``new_id``, then the folder is renamed (a kill in between leaves it under its old id, to migrate again)."""
        final = self.run_dir(new_id)
        if final.exists():
            raise FileExistsError(f"{final}: already stored")
        old = self.run_dir(old_id)
        result = read_result(old) or {}
        result.update(run_id=new_id, config=config)
        write_json(old / "config.json", config)
        write_json(old / RESULT, result)
        os.replace(old, final)

    def open(self) -> None:
        """Create the store folder if needed and remove what dead runners left half-built (:meth:`clean_stale`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()

    def clean_stale(self) -> None:
        """Remove half-built folders left by processes that no longer exist. A folder of another host (shared store)
        cannot be checked by pid: it goes once its run has no live claim and it is older than ``CLAIM_TIMEOUT_S``."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for d in tmp_root.iterdir():
            base, _, host = d.name.partition("@")
            pid = base.rsplit("-", 1)[-1]
            if host in ("", HOST):
                stale = pid.isdigit() and not _alive(int(pid))
            else:
                stale = not self.claimed(base[:16]) and _age(d) > CLAIM_TIMEOUT_S
            if stale:
                shutil.rmtree(d, ignore_errors=True)

    # ----------------------------------------------------------------------------------------------------------------
    # Claims: at most one runner works on a run at a time, whichever executor or host it runs on
    # ----------------------------------------------------------------------------------------------------------------

    def claim_path(self, run_id: str) -> Path:
        return self.root / CLAIMS / run_id

    def claim(self, run_id: str, owner: str, timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
        """Take the run's claim for ``owner``. True when it is ours now: it was free, stale (taken over), or already
        held by ``owner`` (a retry of the same task after its worker died). False when another live owner holds it.

        ``O_CREAT|O_EXCL`` makes the creation atomic, also on NFS (v3 and later)."""
        path = self.claim_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"owner": owner, "pid": os.getpid(), "host": HOST,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self.claim_info(run_id)
                if held is not None and held.get("owner") == owner:
                    write_json(path, info)  # ours already: the same task again, in a new process
                    return True
                if not self._break_stale_claim(run_id, timeout_s):
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
            return True
        return False

    def _break_stale_claim(self, run_id: str, timeout_s: float) -> bool:
        """Remove the claim if it is stale; True when the claim is gone. Breakers take a second ``O_EXCL`` lock and
        check again under it, so two runners that both saw the same stale claim cannot both remove a fresh one."""
        path = self.claim_path(run_id)
        lock = path.with_name(path.name + ".break")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _age(lock) > 60:  # a breaker died between its two lines below
                lock.unlink(missing_ok=True)
            return False
        try:
            if self.claimed(run_id, timeout_s):
                return False
            path.unlink(missing_ok=True)  # stale, or already gone
            return True
        finally:
            os.close(fd)
            lock.unlink(missing_ok=True)

    def claim_info(self, run_id: str) -> dict[str, Any] | None:
        """``{"owner", "pid", "host", "time"}`` of the run's claim, or None (no claim, or one still being written)."""
        try:
            return json.loads(self.claim_path(run_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def claims(self) -> dict[str, dict[str, Any]]:
        """Every readable claim of the store (the runs being run now, or left by a crash), by run id."""
        folder = self.root / CLAIMS
        names = [p.name for p in folder.iterdir() if "." not in p.name] if folder.is_dir() else []
        return {name: info for name in names if (info := self.claim_info(name)) is not None}

    def claimed(self, run_id: str, timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
        """Whether a live owner holds the run's claim."""
        path = self.claim_path(run_id)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return False
        return not _claim_is_stale(self.claim_info(run_id), mtime, timeout_s)

    def heartbeat(self, run_id: str, owner: str) -> None:
        """Touch the run's claim if ``owner`` still holds it (a claim not touched for ``CLAIM_TIMEOUT_S`` is stale)."""
        info = self.claim_info(run_id)
        if info is not None and info.get("owner") == owner:
            try:
                os.utime(self.claim_path(run_id))
            except FileNotFoundError:
                pass

    def release(self, run_id: str, owner: str) -> None:
        """Remove the run's claim if ``owner`` holds it."""
        info = self.claim_info(run_id)
        if info is not None and info.get("owner") == owner:
            self.claim_path(run_id).unlink(missing_ok=True)

    def stamp(self, run_id: str) -> tuple[int, int] | None:
        """Identity of the run's current ``result.json`` (None when there is none): a runner that saw one stamp when it
        planned and finds another after taking the claim knows another runner finished the run meanwhile."""
        try:
            st = (self.run_dir(run_id) / RESULT).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    # ----------------------------------------------------------------------------------------------------------------
    # Sequential records (``peftbench run --until-decided``): the looks, their levels and the decisions so far
    # ----------------------------------------------------------------------------------------------------------------

    def sequential_path(self, study: str) -> Path:
        return self.root / SEQUENTIAL / f"{study}.json"

    def write_sequential(self, study: str, record: dict[str, Any]) -> None:
        """Write (atomically) the sequential record of ``study``."""
        path = self.sequential_path(study)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)

    def read_sequential(self, study: str) -> dict[str, Any] | None:
        """The sequential record of ``study``, None if it never ran with ``--until-decided``."""
        return _read_record(self.sequential_path(study))

    def search_dir(self, study: str) -> Path:
        """The folder of ``study``'s hyperparameter search (``peftbench.search``): Optuna journals and its record."""
        return self.root / SEARCH / study

    def read_search(self, study: str) -> dict[str, Any] | None:
        """The search record of ``study`` (``record.json``), None if it never searched."""
        return _read_record(self.search_dir(study) / "record.json")

    def write_search(self, study: str, record: dict[str, Any]) -> None:
        """Write ``study``'s search record atomically (the Optuna journals beside it are Optuna's own files)."""
        self.search_dir(study).mkdir(parents=True, exist_ok=True)
        write_json(self.search_dir(study) / "record.json", record)

    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if not d.name.startswith(".") and (d / RESULT).is_file())

    def results(self, run_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        ids = self.run_ids() if run_ids is None else run_ids
        out = []
        for run_id in ids:
            result = read_result(self.run_dir(run_id))
            if result is not None:
                result["path"] = str(self.run_dir(run_id))
                out.append(result)
        return out


class RunWriter:
    """The only writer of a run folder. Every file a run holds is written by one of its methods into the run's private
    folder under ``STORE/.tmp/``, which :meth:`commit` moves into place whole (``result.json`` written last). No
    reader sees that folder before then, so its files need no atomic writes of their own. A writer that is never
    committed leaves its folder to :meth:`discard` or, after a crash, to :meth:`Store.clean_stale`.

    The files: ``config.json`` (on creation), ``metrics.jsonl`` (:meth:`append_epoch`; created empty at commit for a
    successful run that trained no epoch), ``predictions.parquet`` (:meth:`write_predictions`), ``spectrum.json``
    (:meth:`write_spectrum`), the weights (``adapter/`` or ``model.safetensors``, saved by
    :func:`peftbench.methods.save_weights` into :attr:`weights_dir` with peft's or safetensors' own savers) and
    ``result.json`` (:meth:`commit`, or :meth:`fail`).

        >>> writer = Store("runs").writer(run.run_id, run.to_dict())                    # doctest: +SKIP
        >>> writer.append_epoch({"epoch": 1, "val_accuracy": 0.8})                    # doctest: +SKIP
        >>> writer.commit({"run_id": run.run_id, "status": "success", ...})           # doctest: +SKIP
    """

    def __init__(self, store: Store, run_id: str, config: dict[str, Any]):
        self.store, self.run_id, self.config = store, run_id, config
        self.dir = store.begin(run_id)
        try:
            write_json(self.dir / CONFIG, config)
        except BaseException:
            self.discard()
            raise

    @property
    def weights_dir(self) -> Path:
        """Where the method saves its weights: the run's folder itself (``adapter/``, ``model.safetensors``)."""
        return self.dir

    def append_epoch(self, row: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``: an epoch's row, as the training loop reports it."""
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_predictions(self, frame: pd.DataFrame) -> None:
        """``predictions.parquet``: one row per test example (columns: docs/design.md, the store section)."""
        missing = {"id", "text", "label", "pred", "probs", "length"} - set(frame.columns)
        if missing:
            raise ValueError(f"{PREDICTIONS}: columns {sorted(missing)} missing")
        frame.to_parquet(self.dir / PREDICTIONS, index=False)

    def write_spectrum(self, record: dict[str, Any]) -> None:
        """``spectrum.json`` (its fields: :mod:`peftbench.spectrum`)."""
        write_json(self.dir / SPECTRUM, record, indent=None)

    def commit(self, result: dict[str, Any]) -> Path:
        """Write ``result.json`` (a success or a failure) and move the folder into place (:meth:`Store.commit`); the
        run's folder. Any error on the way (a full disk) discards the folder and is raised: the run stays to do."""
        try:
            if result.get("status") == "success":
                (self.dir / METRICS).touch()  # a successful run always has its (maybe empty) metrics.jsonl
            write_json(self.dir / RESULT, result)
            return self.store.commit(self.run_id, self.dir)
        except BaseException:
            self.discard()
            raise

    def fail(self, error: str, **fields: Any) -> dict[str, Any]:
        """Commit the run as failed with ``error`` (one line) and ``fields`` (``environment``, ``timing``, ...);
        returns the result written."""
        result = {"run_id": self.run_id, "status": "failed", "error": error, "config": self.config, **fields}
        self.commit(result)
        return result

    def discard(self) -> None:
        """Remove the half-built folder (nothing of the run is stored)."""
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Replacing a folder whole (a run folder replacing a failed one; a report replacing the previous report)
# --------------------------------------------------------------------------------------------------------------------


def fresh_sibling(out: Path) -> Path:
    """A new empty folder beside ``out`` (same filesystem, so :func:`swap_in` is a rename), named ``.NAME.new-PID``,
    after tidying what writers that died left there: a ``.NAME.old-PID`` when ``out`` itself is missing (a writer
    killed between the two renames of :func:`swap_in`) goes back to ``out``; every other leftover is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for left in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = left.name[len(out.name) + 2:].partition("-")
        if not (left.is_dir() and pid.isdigit() and not _alive(int(pid))):
            continue
        if kind == "old" and not out.exists():
            os.replace(left, out)
        else:
            shutil.rmtree(left, ignore_errors=True)
    new = out.parent / f".{out.name}.new-{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    return new


def swap_in(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` (from :func:`fresh_sibling`) at ``out``, replacing the folder there."""
    if not out.exists():
        os.replace(new, out)
        return
    replace_folder(new, out, out.parent / f".{out.name}.old-{os.getpid()}")


def replace_folder(new: Path, target: Path, aside: Path) -> None:
    """Replace the folder ``target`` by the folder ``new`` and delete the old one.

    Where the system can (Linux ``renameat2`` with ``RENAME_EXCHANGE``) the two folders trade places in one atomic
    step: a reader, or a kill at any moment, sees the old folder whole or the new one whole. Elsewhere (other systems,
    filesystems without that call) the old folder is renamed to ``aside`` first, then ``new`` to ``target``: a kill
    between the two renames leaves no ``target`` but the old folder whole at ``aside`` (:func:`fresh_sibling` puts it
    back); any other error puts it back at once."""
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # the old folder, now
        return
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False, changing nothing, where the system or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # the filesystem has no exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's ``renameat2`` (Linux 3.15+, glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _claim_is_stale(info: dict[str, Any] | None, mtime: float, timeout_s: float) -> bool:
    """Untouched for ``timeout_s``, or held by a process of this host that no longer exists. (A claim that cannot be
    read yet is being written: only the timeout applies.)"""
    if time.time() - mtime > timeout_s:
        return True
    if info is None or info.get("host") != HOST or not isinstance(info.get("pid"), int):
        return False
    return not _alive(info["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


METRIC_KEYS = METRICS_STORED + ("loss",)  # the columns test_* and val_* of load_results


CONFIG_PREFIXES = (("method_params", "param_"), ("train", "train_"), ("dataset", "dataset_"))


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """One result.json → one flat row: identity (``run_id``, ``study``, ``arm``, ``model``, ``dataset`` (its name),
    ``method``, ``seed``), the short columns the report reads (``r``, ``lora_alpha``, ``lr``, ``lr_scheduler``,
    ``epochs``), every config field (method parameters as ``param_<name>``, train settings as ``train_<name>``,
    dataset settings as ``dataset_<name>``), metrics (``test_*``, ``val_*``), ``params_*`` counts and the costs."""
    cfg = result.get("config", {})
    mparams = cfg.get("method_params", {})
    train = cfg.get("train", {})
    metrics = result.get("metrics") or {}
    row = {
        "run_id": result.get("run_id"), "status": result.get("status"), "error": result.get("error"),
        "study": cfg.get("study"), "arm": cfg.get("arm"), "model": cfg.get("model"),
        "dataset": (cfg.get("dataset") or {}).get("name"), "method": cfg.get("method"), "seed": cfg.get("seed"),
        "r": mparams.get("r"), "lora_alpha": mparams.get("lora_alpha"),
        "lr": train.get("lr"), "lr_scheduler": train.get("lr_scheduler"), "epochs": train.get("epochs"),
        "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
    }
    for field, prefix in CONFIG_PREFIXES:
        for key, value in (cfg.get(field) or {}).items():
            row[prefix + key] = value
    for split, prefix in (("test", "test_"), ("validation", "val_")):
        for key in METRIC_KEYS:
            row[prefix + key] = (metrics.get(split) or {}).get(key)
    for key, value in (result.get("params") or {}).items():
        row[f"params_{key}"] = value
    row.update(result.get("costs") or {})
    row["path"] = result.get("path")
    return row


def load_results(store: str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """All runs of a store (or the given run ids) as a DataFrame, one row per run (columns: :func:`flatten`).

        >>> df = load_results("runs")                                               # doctest: +SKIP
        >>> df.groupby(["arm", "train_batch_size", "param_use_dora"])["test_accuracy"].mean()  # doctest: +SKIP
    """
    rows = [flatten(r) for r in Store(store).results(run_ids)]
    return pd.DataFrame(rows)

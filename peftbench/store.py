"""The run store: one folder per run, named by the run id, written atomically; results as a DataFrame.

A run is built in ``STORE/.tmp/<run_id>-<pid>/`` and renamed to ``STORE/<run_id>/`` when it is complete, so a crash
(Ctrl-C, kill -9) never leaves a half-written run behind and a finished run is never redone.

Example::

    >>> from peftbench.store import load_results
    >>> df = load_results("runs")        # doctest: +SKIP
    >>> df.groupby("arm")["test_accuracy"].mean()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

RESULT = "result.json"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


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
    """A folder of run folders. Only this class (and the report writer) touches the store on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    def status(self, run_id: str) -> str | None:
        """``success``, ``failed`` or None (never run, or no complete folder)."""
        result = read_result(self.run_dir(run_id))
        return result.get("status") if result else None

    def begin(self, run_id: str) -> Path:
        """A fresh private folder to build the run in."""
        tmp = self.root / ".tmp" / f"{run_id}-{os.getpid()}"
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
            trash = self.root / ".tmp" / f"{run_id}-replaced-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
            return final
        os.replace(tmp, final)
        return final

    def clean_stale(self) -> None:
        """Remove half-built folders left by processes that no longer exist."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for d in tmp_root.iterdir():
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


METRIC_KEYS = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "precision_weighted",
               "recall_weighted", "roc_auc", "loss")


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """One result.json → one flat row."""
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
    for split, prefix in (("test", "test_"), ("validation", "val_")):
        for key in METRIC_KEYS:
            row[prefix + key] = (metrics.get(split) or {}).get(key)
    for key, value in (result.get("params") or {}).items():
        row[f"params_{key}"] = value
    row.update(result.get("costs") or {})
    row["path"] = result.get("path")
    return row


def load_results(store: str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """All runs of a store (or the given run ids) as a DataFrame, one row per run."""
    rows = [flatten(r) for r in Store(store).results(run_ids)]
    return pd.DataFrame(rows)

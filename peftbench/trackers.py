"""Experiment trackers: each run also logged to TensorBoard, MLflow or Weights & Biases, through their own libraries.

The store stays the record; a tracker mirrors each run into the tool a team already watches: the run's config
(flattened, ``train.lr``, ``method_params.r``, ...), one point per epoch (``train/loss``, ``validation/accuracy``, ...:
the rows of ``metrics.jsonl``), and when the run is stored its test metrics (``test/accuracy``, ...), the validation
metrics of the stored model (``final_validation/...``), parameter counts (``params/trainable``, ``params/total``, ...)
and costs (``costs/train_time_s``, ``costs/peak_memory_mb``, an ``llm`` arm's ``costs/estimated_cost_usd``, ...).
Runs are grouped by study: an MLflow experiment named after the study, a TensorBoard log dir
``STORE/.tensorboard/<study>/<run>``, a wandb group named after the study.

Tracking is a study setting (``[tracking] report_to = ["tensorboard"]``, or ``peftbench run --report-to``), not part
of a run's identity: it changes no run id. A tracker that fails (no server, no API key, a full disk) prints one warning
and is dropped for the rest of that run; the run itself is stored as usual (a tracker is only called after the
run's files are written: per epoch after its ``metrics.jsonl`` line, at the end after the run folder is committed).

Default locations are inside the store unless the tool's own environment says otherwise: MLflow
``sqlite:///STORE/.mlflow/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set; wandb files under ``STORE/.wandb`` unless
``WANDB_DIR`` is set (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``WANDB_API_KEY`` are wandb's own).

Example::

    >>> from peftbench.trackers import check
    >>> check({"report_to": []})   # raises ConfigError when a named tracker's library is missing
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from peftbench import progress
from peftbench.fields import ConfigError

if TYPE_CHECKING:
    from peftbench.config import RunConfig


class Tracker(Protocol):
    """One run in one tracking tool. Constructing it starts the run there."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One point per metric at step ``epoch``."""

    def finish(self, summary: dict[str, float], status: str, error: str | None) -> None:
        """The run's final numbers; ``status``: success, failed or interrupted."""


# --------------------------------------------------------------------------------------------------------------------
# What is logged (the same for every backend)
# --------------------------------------------------------------------------------------------------------------------


def run_name(run: "RunConfig") -> str:
    """The run's label with the model shortened to its last path part: ``lora r=4 | tiny-st | tiny | lr=0.03 | seed=0``."""
    short = run.model.rstrip("/").rsplit("/", 1)[-1].removeprefix("builtin:")
    return run.label.replace(run.model, short, 1)


def flat_params(run: "RunConfig") -> dict[str, Any]:
    """The run's config flattened with dots (``train.lr``, ``dataset.source``), its run id first."""
    out: dict[str, Any] = {"run_id": run.run_id}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", run.to_dict())
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` row as tracker metrics: ``val_accuracy`` → ``validation/accuracy``, ``train_loss`` →
    ``train/loss``, ``lr`` → ``train/lr``, ... (``epoch`` and ``step`` are the step, not metrics)."""
    out = {}
    for key, value in row.items():
        if key in ("epoch", "step") or not _number(value):
            continue
        name = f"validation/{key[4:]}" if key.startswith("val_") else f"train/{key.removeprefix('train_')}"
        out[name] = float(value)
    return out


def final_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A stored result's numbers: ``test/*``, ``final_validation/*``, ``params/*``, ``costs/*``, ``run/best_epoch``,
    ``run/epochs_run`` (numbers only: a confusion matrix, a missing ROC AUC or a flag are left out)."""
    metrics = result.get("metrics") or {}
    groups = {"test": metrics.get("test"), "final_validation": metrics.get("validation"),
              "params": result.get("params"), "costs": result.get("costs"),
              "run": {k: metrics.get(k) for k in ("best_epoch", "epochs_run")}}
    return {f"{group}/{k}": float(v) for group, values in groups.items() for k, v in (values or {}).items()
            if _number(v)}


def _slug(text: str) -> str:
    """A folder name: runs of other characters than letters, digits and ``.=-`` become one ``_``."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "_"


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Event files in ``STORE/.tensorboard/<study>/<run name>-<run id>`` (``tensorboard --logdir
    STORE/.tensorboard/<study>``): scalars per epoch, the final numbers, the config as text and in the HPARAMS tab."""

    requires = ("tensorboard",)

    def __init__(self, run: "RunConfig", root: Path, settings: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = root / ".tensorboard" / _slug(run.study) / f"{_slug(run_name(run))}-{run.run_id}"
        self.writer = SummaryWriter(str(self.log_dir))
        self.params = flat_params(run)
        self.writer.add_text("config", "```\n" + json.dumps(self.params, indent=1, default=str) + "\n```")
        self.writer.flush()
        self.last_epoch = 0

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        self.last_epoch = epoch

    def finish(self, summary: dict[str, float], status: str, error: str | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        hp = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
              for k, v in self.params.items() if v is not None}
        hp["status"] = status
        for item in hparams(hp, summary):  # the HPARAMS tab: this run's config beside its final numbers
            self.writer.file_writer.add_summary(item)
        for key, value in summary.items():
            self.writer.add_scalar(key, value, self.last_epoch)
        if error:
            self.writer.add_text("error", error)
        self.writer.close()


class MlflowTracker:
    """An MLflow run in the experiment named after the study, through ``MlflowClient``: params = the flattened config,
    metrics with their epoch history, tags ``peftbench.run_id`` / ``peftbench.arm`` / ``peftbench.method``."""

    requires = ("mlflow", "sqlalchemy", "alembic")  # the last two: the default local sqlite store
    STATUS = {"success": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(self, run: "RunConfig", root: Path, settings: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri, artifacts = None, None  # None: mlflow's own MLFLOW_TRACKING_URI
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            folder = (root / ".mlflow").resolve()
            folder.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(run.study)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(run.study, artifact_location=artifacts)
            except MlflowException:  # another runner created it meanwhile
                experiment_id = self.client.get_experiment_by_name(run.study).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = {"peftbench.run_id": run.run_id, "peftbench.arm": run.arm, "peftbench.method": run.method,
                "peftbench.seed": str(run.seed)}
        self.run_id = self.client.create_run(experiment_id, run_name=run_name(run), tags=tags).info.run_id
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v[:6000])
                  for k, v in flat_params(run).items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._log(metrics, epoch)

    def finish(self, summary: dict[str, float], status: str, error: str | None) -> None:
        self._log(summary, 0)
        if error:
            self.client.set_tag(self.run_id, "peftbench.error", error[:5000])
        self.client.set_terminated(self.run_id, self.STATUS[status])


class WandbTracker:
    """A wandb run in project ``tracking.wandb_project`` (else ``WANDB_PROJECT``, else ``peftbench``), group = the
    study, job type = the arm: config = the flattened config, history per epoch, the final numbers in its summary.
    ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` uploads it later)."""

    requires = ("wandb",)

    def __init__(self, run: "RunConfig", root: Path, settings: dict[str, Any]):
        import wandb

        folder = Path(os.environ.get("WANDB_DIR") or root / ".wandb")
        folder.mkdir(parents=True, exist_ok=True)
        project = settings.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "peftbench"
        self.run = wandb.init(project=project, group=run.study, job_type=run.arm, name=run_name(run),
                              tags=[run.method], config=flat_params(run), dir=str(folder), reinit="create_new",
                              settings=wandb.Settings(console="off", quiet=True))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=epoch)

    def finish(self, summary: dict[str, float], status: str, error: str | None) -> None:
        self.run.summary.update({**summary, "status": status, **({"error": error} if error else {})})
        self.run.finish(exit_code=0 if status == "success" else 1)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


# --------------------------------------------------------------------------------------------------------------------
# What the executors call
# --------------------------------------------------------------------------------------------------------------------


def check(settings: dict[str, Any] | None) -> None:
    """Import each named tracker's libraries now (before any run trains, and so every run's peak memory counts them
    alike); a missing one is a one-line ConfigError saying what to install."""
    for name in (settings or {}).get("report_to", []):
        for module in BACKENDS[name].requires:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"tracking.report_to: {name!r} needs the {module} library: "
                                  f"pip install 'peftbench[{name}]'") from None


class RunTracking:
    """The trackers of one run (none when the study names none). Every call reaches every backend; a backend that
    raises prints one warning and gets no more of this run. A run left without :meth:`finish` (Ctrl-C) is closed as
    interrupted when the ``with`` block ends.

        >>> with RunTracking({"report_to": []}, run, store.root) as tracking:     # doctest: +SKIP
        ...     tracking.finish(execute_run(run, store, device, epoch_hook=tracking.log_epoch))
    """

    def __init__(self, settings: dict[str, Any] | None, run: "RunConfig", root: Path):
        self.run, self.finished = run, False
        self.backends: dict[str, Tracker] = {}
        for name in (settings or {}).get("report_to", []):
            backend = self._guard(name, "start", lambda: BACKENDS[name](run, Path(root), settings))
            if backend is not None:
                self.backends[name] = backend

    def _guard(self, name: str, what: str, call) -> Any:
        """``call()``'s value; None, with one warning and the backend dropped, when it raises."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - a tracker never fails or stops a run
            self.backends.pop(name, None)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            progress.say(f"warning: {name} tracking of {self.run.label} failed at {what} ({type(e).__name__}: "
                         f"{first}); the run is stored as usual, {name} gets no more of it")
            return None

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row, already written."""
        metrics = epoch_metrics(row)
        for name, backend in list(self.backends.items()):
            self._guard(name, f"epoch {row.get('epoch')}", lambda: backend.log_epoch(int(row["epoch"]), metrics))

    def finish(self, result: dict[str, Any] | None) -> None:
        """The stored ``result`` (None: the run was interrupted and nothing was stored)."""
        self.finished = True
        summary = final_metrics(result or {})
        status = (result or {}).get("status", "interrupted")
        error = (result or {}).get("error")
        for name, backend in list(self.backends.items()):
            self._guard(name, "finish", lambda: backend.finish(summary, status, error))
        self.backends.clear()

    def __enter__(self) -> "RunTracking":
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.finish(None)

"""Study files → validated data → the list of runs they expand into.

Pure: nothing here trains or writes. A study is a TOML (or YAML) file::

    name = "demo"
    seeds = [0, 1, 2]
    models = ["builtin:minilm"]

    [datasets.rotten_tomatoes]
    source = "builtin:rotten_tomatoes"

    [train]
    epochs = 3
    lr = 1e-4

    [[arms]]
    method = "lora"
    r = [1, 4, 16]          # list values expand as a grid
    lr = [5e-4, 1e-3]       # arm settings override [train]

Example::

    >>> from peftbench.config import load_study, expand_runs
    >>> study = load_study("studies/demo.toml")          # doctest: +SKIP
    >>> [run.label for run in expand_runs(study)][:2]    # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftbench import methods
from peftbench.evaluate import METRICS  # the report's metric choices (also importable from here)
from peftbench.fields import Field, by_name, reference_table
from peftbench.trackers import BACKENDS as TRACKERS
from peftbench.fields import ConfigError, check_value  # also importable from here

BUILTIN_STUDIES = Path(__file__).parent / "studies"
DEFAULT_STUDY = BUILTIN_STUDIES / "demo.toml"


# --------------------------------------------------------------------------------------------------------------------
# Field specs (peftbench.fields.Field: kind, default, one-line doc, constraint)
# --------------------------------------------------------------------------------------------------------------------

LEARNING_RATE = "a positive learning rate"

TRAIN_FIELDS: dict[str, Field] = by_name(
    Field("epochs", int, 3, "maximum number of passes over the training split", minimum=1),
    Field("batch_size", int, 32, "training examples per optimizer step", minimum=1),
    Field("eval_batch_size", int, 64, "examples per forward pass during evaluation", minimum=1),
    Field("lr", float, 5e-5, "peak learning rate of AdamW (a nuisance parameter: give a list to sweep it)",
          minimum=0, exclusive_minimum=True, expected=LEARNING_RATE),
    Field("head_lr", "float?", None, "peak learning rate of the trained head modules (the arm's `head`); default: lr. "
          "Sweepable like lr", minimum=0, exclusive_minimum=True, expected=LEARNING_RATE),
    Field("weight_decay", float, 0.01, "AdamW decoupled weight decay (not applied to biases and LayerNorm weights)",
          minimum=0),
    Field("lr_scheduler", str, "linear", "learning-rate schedule after warmup: linear, cosine or constant",
          choices=("linear", "cosine", "constant")),
    Field("warmup_ratio", float, 0.0, "fraction of all training steps spent warming the learning rate up from 0",
          minimum=0, maximum=1, exclusive_maximum=True),
    Field("max_grad_norm", float, 1.0, "clip the global gradient norm to this value (0 disables clipping)", minimum=0),
    Field("max_length", int, 128, "truncate texts to this many tokens (batches are padded only to their longest text)",
          minimum=1),
    Field("max_tokens_per_batch", "int?", None, "bound memory: cut a batch whose padded size would exceed this many "
          "tokens into pieces (training accumulates their gradients into one step)", minimum=1),
    Field("early_stopping_patience", "int?", None, "stop after this many epochs without validation improvement",
          minimum=1),
    Field("metric_for_best", str, "accuracy", "validation metric that picks the best epoch (accuracy, f1_macro, ...)",
          choices=("accuracy", "f1_macro", "f1_weighted", "loss")),
    Field("bf16", bool, True, "bfloat16 autocast where the device runs it natively (CUDA, CPUs with AVX512-BF16 or "
          "AMX); fp32 elsewhere"),
    Field("pooling", str, "auto", "sentence representation: cls (the model's own head), mean, or auto",
          choices=("auto", "cls", "mean")),
    Field("cache_frozen_features", bool, True, "frozen method: run the encoder once per example and reuse its output "
          "(shared by the store's runs with the same encoder weights, token ids and settings)"),
    Field("length_buckets", bool, True, "batch texts of similar length together (sorted within large random pools), "
          "so batches carry little padding"),
    Field("fused_optimizer", bool, True, "fused AdamW kernel on CUDA and CPU (the same update in one pass)"),
    Field("merge_for_eval", bool, True, "LoRA: merge the adapters into the base weights for the final predictions "
          "(after saving them)"),
    Field("gradient_checkpointing", bool, False, "recompute activations in the backward pass (transformers' gradient "
          "checkpointing, non-reentrant): much less activation memory for big models, slower"),
    Field("bf16_weights", bool, False, "hold the frozen pretrained weights in bfloat16 (trainable parameters and their "
          "optimizer state stay fp32); only with bf16 autocast, else ignored (recorded per run)"),
    Field("fast_dropout", bool, False, "CPU: dropout masks from bulk random bits (numpy SFC64 seeded by torch's "
          "generator; the same Bernoulli(1-p) masks, cheaper to draw), attention-probability dropout included"),
    Field("pack_runs", int, 1, "train up to this many runs in one forward/backward pass when they share the model, "
          "dataset and training shape and only their adapters differ (LoRA seeds, ranks, learning rates): the frozen "
          "base runs once for all, each run keeps its own adapters, head, optimizer, data order and dropout draws "
          "(docs/benchmarks.md); 1: every run alone", minimum=1, expected="an integer >= 1"),
)

FRACTION = "a fraction in (0, 1)"
DATASET_FIELDS: dict[str, Field] = by_name(
    Field("source", str, None, "builtin:rotten_tomatoes, a hub dataset id, or a local folder/file (CSV, TSV, JSONL, "
          "Parquet)"),
    Field("config_name", "str?", None, "hub dataset configuration name (the second argument of "
          "datasets.load_dataset)"),
    Field("text_column", str, "text", "column holding the text"),
    Field("text_pair_column", "str?", None, "column holding the second text of a sentence pair (premise/hypothesis, "
          "question/sentence), tokenized as a pair with text_column; none: single texts"),
    Field("label_column", str, "label", "column holding the label (ids or names)"),
    Field("labels", "list[str]?", None, "label names in id order (default: labels.txt, the hub's ClassLabel, or "
          "sorted names)"),
    Field("train_split", str, "train", "split (hub) or file stem (local folder) used for training"),
    Field("validation_split", str, "validation", "split used for model selection; carved from train when absent or "
          "''"),
    Field("test_split", str, "test", "split used only for the final evaluation"),
    Field("validation_fraction", float, 0.1, "fraction of train carved (stratified) as validation when there is none; "
          "builtin:rotten_tomatoes: share of the movies held out as validation", minimum=0, maximum=1,
          exclusive_minimum=True, exclusive_maximum=True, expected=FRACTION),
    Field("test_fraction", float, 0.2, "fraction of train carved (stratified) as test when there is no test split; "
          "builtin:rotten_tomatoes: share of the movies held out as test", minimum=0, maximum=1,
          exclusive_minimum=True, exclusive_maximum=True, expected=FRACTION),
    Field("split_seed", int, 0, "seed of carved splits and of subsampling (fixed across run seeds)"),
    Field("max_train", "int?", None, "stratified, seeded subsample of the training split", minimum=1),
    Field("max_validation", "int?", None, "stratified, seeded subsample of the validation split", minimum=1),
    Field("max_test", "int?", None, "stratified, seeded subsample of the test split", minimum=1),
)

# Dataset fields added after runs were stored: at these values they are left out of the dataset spec (and so out of
# the run id), so every run stored before they existed keeps its id; code reads them with ``.get(key)``.
DATASET_OMITTED_AT_DEFAULT = {"text_pair_column": None}

REPORT_FIELDS: dict[str, Field] = by_name(
    Field("reference", str, "full", "arm the others are compared with (its label, e.g. 'full' or 'lora r=64')"),
    Field("metric", str, "accuracy", "headline test metric of tables and verdicts", choices=METRICS),
    Field("selection_metric", str, "accuracy", "validation metric that picks the nuisance setting per arm",
          choices=METRICS + ("loss",)),
    Field("margin", float, 1.0, "non-inferiority margin in points of the headline metric", minimum=0,
          exclusive_minimum=True, expected="a number of points > 0 (a non-inferiority margin)"),
    Field("out_of_scope_label", "str?", None, "the out-of-scope class (e.g. 'oos'): the report adds in-scope accuracy "
          "and out-of-scope recall per arm (Larson et al. 2019)"),
)

TRACKING_FIELDS: dict[str, Field] = by_name(
    Field("report_to", "list[str]", [], f"experiment trackers each run is also logged to: {', '.join(TRACKERS)} (not "
          "part of the run ids; `peftbench run --report-to` overrides it)", choices=TRACKERS,
          expected=f"some of {', '.join(TRACKERS)}"),
    Field("wandb_project", "str?", None, "wandb project of the runs (default: WANDB_PROJECT, else peftbench)"),
)

def _nonempty_list(what: str, item: Any):
    """A ``parse`` for a top-level list setting: one value or a non-empty list of them."""

    def parse(where: str, value: Any) -> list:
        value = [value] if isinstance(value, item) and not isinstance(value, bool) else value
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: expected a non-empty list of {what}, got {value!r}")
        return [check_value(where, item, v) for v in value]

    return parse


STUDY_TOP_FIELDS: dict[str, Field] = by_name(
    Field("name", "str?", None, "the study's name, the label of its runs (default: the file's name)"),
    Field("description", str, "", "what the study asks, in a sentence (shown in the report)"),
    Field("store", str, "runs", "the store folder of its runs (relative to the working directory; `--store` overrides "
          "it)"),
    Field("seeds", "list[int]", [0], "run seeds: every arm and setting runs once per seed (one integer or a list)",
          parse=_nonempty_list("integers", int)),
    Field("models", "list[str]", ["builtin:minilm"], "encoders: builtin:minilm, hub ids or local folders (relative "
          "to the study file)", parse=_nonempty_list("model names", str)),
)
STUDY_FIELDS = set(STUDY_TOP_FIELDS) | {"datasets", "train", "arms", "report", "tracking", "search"}
ARM_FIXED_FIELDS = {"method", "name"}

# Hyperparameter search (peftbench.search, through Optuna): the study's `search` table, and the train settings that
# may be given as a range table (`lr = { low = 1e-5, high = 1e-3, log = true }`) or as `{ choices = [...] }`.
SEARCH_FIELDS: dict[str, Field] = by_name(
    Field("trials", int, None, "trials per searched arm (per model × dataset): the same number for every arm, each an "
          "ordinary stored run on the study's first seed; required", minimum=1),
    Field("sampler", str, "tpe", "Optuna sampler proposing the trials: tpe or random", choices=("tpe", "random")),
    Field("seed", int, 0, "seed of the sampler (the same proposals on every re-run and resume)"),
    Field("batch", int, 1, "trials proposed at once per arm (run together: in parallel with --executor ray)",
          minimum=1),
    Field("startup", "int?", None, "tpe: random trials before TPE takes over (default: Optuna's 10)", minimum=1),
)
SEARCHABLE = ("lr", "head_lr", "weight_decay", "warmup_ratio", "max_grad_norm", "batch_size", "epochs",
              "early_stopping_patience", "lr_scheduler")
RANGE_KEYS = ("low", "high", "log", "step", "choices")


def _check_table(where: str, table: Any, fields: dict, extra: set[str] = frozenset()) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - set(fields) - set(extra))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (expected one of: {', '.join(sorted(set(fields) | extra))})")
    return table


def _check_train(where: str, key: str, value: Any) -> Any:
    return TRAIN_FIELDS[key].check(f"{where}.{key}", value)


def is_range(value: Any) -> bool:
    """A train setting given as a search range table (``{low, high, log, step}`` or ``{choices}``), not a value."""
    return isinstance(value, dict)


def _check_range(where: str, key: str, table: dict[str, Any]) -> dict[str, Any]:
    """A search range of train setting ``key`` (see SEARCHABLE), normalised: ``{"choices": [...]}`` or
    ``{"low", "high", "log"[, "step"]}``; each bound and choice is checked like a value of the setting."""
    at = f"{where}.{key}"
    if key not in SEARCHABLE:
        raise ConfigError(f"{at}: a search range table is only for {', '.join(SEARCHABLE)}; got one for {key}")
    unknown = sorted(set(table) - set(RANGE_KEYS))
    if unknown:
        raise ConfigError(f"{at}: unknown key '{unknown[0]}' in a search range (expected one of: "
                          f"{', '.join(RANGE_KEYS)})")

    def value(sub: str, v: Any) -> Any:
        if v is None:
            raise ConfigError(f"{at}.{sub}: expected a value of {key}, got None")
        try:
            return _check_train(where, key, v)
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"{at}:", f"{at}.{sub}:", 1)) from None

    if "choices" in table:
        if len(table) > 1:
            raise ConfigError(f"{at}: 'choices' goes alone in a search range (no low/high/log/step with it)")
        choices = table["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}.choices: expected a non-empty list of values, got {choices!r}")
        return {"choices": [value("choices", c) for c in choices]}
    kind = TRAIN_FIELDS[key].kind
    if kind not in (int, float, "int?", "float?"):
        raise ConfigError(f"{at}: {key} takes no low/high range; give its values as {{ choices = [...] }}")
    for bound in ("low", "high"):
        if bound not in table:
            raise ConfigError(f"{at}.{bound}: missing (a search range is {{ low = ..., high = ... }})")
    low, high = value("low", table["low"]), value("high", table["high"])
    if not low < high:
        raise ConfigError(f"{at}: expected low < high, got low = {low!r}, high = {high!r}")
    out = {"low": low, "high": high, "log": check_value(f"{at}.log", bool, table.get("log", False))}
    if out["log"] and low <= 0:
        raise ConfigError(f"{at}.log: a log range needs low > 0, got low = {low!r}")
    if "step" in table:
        if out["log"]:
            raise ConfigError(f"{at}.step: not with log = true (Optuna samples a log range without a step)")
        step = check_value(f"{at}.step", int if kind in (int, "int?") else float, table["step"])
        if not step > 0:
            raise ConfigError(f"{at}.step: expected a number > 0, got {step!r}")
        out["step"] = step
    return out


def _train_setting(where: str, key: str, value: Any) -> Any:
    """A train setting of ``[train]`` or an arm: a value, a list (grid axis) or a search range table."""
    if is_range(value):
        return _check_range(where, key, value)
    return _grid(where, key, value, lambda w, k, v: _check_train(w, k, v))


# --------------------------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One method with its parameters; list values are grid axes (expanded by expand_runs)."""

    method: str
    name: str | None = None
    method_params: dict[str, Any] = field(default_factory=dict)  # value or list of values (grid)
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the study's [train], value or list


@dataclass
class Study:
    """A validated study: the cross product models × datasets × arms × grid × seeds."""

    name: str
    path: Path | None
    store: str
    seeds: list[int]
    models: list[str]
    datasets: dict[str, dict[str, Any]]
    train: dict[str, Any]  # values or lists (grid)
    arms: list[Arm]
    report: dict[str, Any]
    description: str = ""
    search: dict[str, Any] | None = None  # the `search` table (peftbench.search); None: no search
    tracking: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(  # [tracking], defaults filled in
        {k: f.default for k, f in TRACKING_FIELDS.items()}))


@dataclass
class RunConfig:
    """A fully resolved run. ``run_id`` hashes everything but the labels ``study`` and ``arm`` and where the study
    lies (``study_dir``): a local model folder or dataset path is hashed relative to the study file's folder, so a
    study moved together with its data (another machine, another folder) keeps its run ids (see :meth:`identity`)."""

    study: str
    arm: str
    model: str
    dataset: dict[str, Any]
    method: str
    method_params: dict[str, Any]
    train: dict[str, Any]
    seed: int
    study_dir: str | None = None  # absolute folder of the study file; None for a study without a file (train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self, paths: str = "relative") -> dict[str, Any]:
        """The config without its labels, local paths (absolute ones: a local model folder, a local ``source``)
        ``relative`` to ``study_dir`` (as ``model_rel`` and ``dataset.source_rel``; unchanged without a study_dir),
        kept ``absolute`` (the run ids of peftbench before portable ids), or ``dropped`` (to recognise one run stored
        under another location's paths). Built-in sources and hub ids are never changed."""
        d = self.to_dict()
        for label in ("study", "arm", "study_dir"):
            d.pop(label)
        if paths == "absolute" or (paths == "relative" and not self.study_dir):
            return d
        d["dataset"] = dict(d["dataset"])
        for table, key in ((d, "model"), (d["dataset"], "source")):
            if is_local_path(table[key]):
                value = table.pop(key)
                if paths == "relative":
                    table[f"{key}_rel"] = study_relative(value, self.study_dir)
        return d

    @property
    def hashed(self) -> dict[str, Any]:
        """What :attr:`run_id` hashes."""
        return self.identity("relative")

    @property
    def run_id(self) -> str:
        return config_hash(self.hashed)

    @property
    def legacy_run_id(self) -> str:
        """The id this run had before portable run ids (absolute local paths hashed): see ``peftbench migrate``."""
        return config_hash(self.identity("absolute"))

    @property
    def label(self) -> str:
        lr = self.train.get("lr")  # (the untrained arm has none: left out, never "lr=None")
        return " | ".join([self.arm, self.model, self.dataset["name"]] + ([f"lr={lr}"] if lr is not None else [])
                          + [f"seed={self.seed}"])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """From ``config.json`` (one written before a field with a default existed gets the default)."""
        fields = dataclasses.fields(cls)
        return cls(**{f.name: d[f.name] for f in fields if f.name in d or f.default is dataclasses.MISSING})


def config_hash(hashed: dict[str, Any]) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON of ``hashed``: a run id."""
    blob = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_local_path(value: str) -> bool:
    """A model or dataset source that names a place on this machine (study paths are resolved to absolute ones)."""
    return not value.startswith("builtin:") and Path(value).is_absolute()


def study_relative(path: str, study_dir: str) -> str:
    """``path`` relative to ``study_dir`` (symlinks resolved, ``/`` separators): what a run id hashes of a local path."""
    return Path(os.path.relpath(os.path.realpath(path), os.path.realpath(study_dir))).as_posix()


# --------------------------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------------------------


def read_study_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML or YAML study file into a raw dict (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a table of study settings at the top level")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """``datasets.sst2.source=../shared/data/sst2`` → (["datasets", "sst2", "source"], "../shared/data/sst2").

    The value is read as a TOML value when it parses as one (numbers, booleans, lists, quoted strings), else as a
    bare string.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE (e.g. train.epochs=1)")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return [k for k in key.strip().split(".") if k], parsed


PATH_KEYS = {"source", "store"}


def apply_overrides(raw: dict[str, Any], overrides: list[str], cwd: Path | None = None) -> dict[str, Any]:
    """Apply ``--set`` overrides. Relative paths given on the command line are taken relative to ``cwd``."""
    raw = copy.deepcopy(raw)
    cwd = cwd or Path.cwd()
    for text in overrides:
        keys, value = parse_override(text)
        if not keys:
            raise ConfigError(f"--set {text}: empty key")
        if keys[-1] in PATH_KEYS and isinstance(value, str) and not value.startswith("builtin:"):
            if (cwd / value).exists():
                value = str((cwd / value).resolve())
        if keys[0] == "models" and isinstance(value, (str, list)):
            values = [value] if isinstance(value, str) else value
            value = [str((cwd / v).resolve()) if isinstance(v, str) and (cwd / v).is_dir() else v for v in values]
        node = raw
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(k)]
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {text}: no item {k} in {'.'.join(keys[:i])}") from None
            else:
                node = node.setdefault(k, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {text}: {'.'.join(keys[: i + 1])} is not a table")
        if isinstance(node, list):
            try:
                node[int(keys[-1])] = value
            except (ValueError, IndexError):
                raise ConfigError(f"--set {text}: no item {keys[-1]} in {'.'.join(keys[:-1])}") from None
        else:
            node[keys[-1]] = value
    return raw


def _resolve_path(value: str, base: Path | None, where: str) -> str:
    """Relative local paths in a study file are relative to the file's folder."""
    if "\x00" in value:
        raise ConfigError(f"{where}: expected a path or name, got one with a NUL character: {value!r}")
    if base is None or value.startswith("builtin:") or Path(value).is_absolute():
        return value
    candidate = (base / value).resolve()
    return str(candidate) if candidate.exists() or value.startswith(".") else value


def validate_study(raw: dict[str, Any], path: Path | None = None) -> Study:
    """Turn a raw dict into a Study, raising ConfigError (one line, naming the field) on the first problem."""
    where = str(path) if path else "study"
    _check_table(where, raw, {k: None for k in STUDY_FIELDS})
    base = path.parent.resolve() if path else None

    top = {k: f.check(f"{where}: {k}", raw.get(k, f.default)) for k, f in STUDY_TOP_FIELDS.items()}
    name = top["name"] if top["name"] is not None else (path.stem if path else "study")
    description, seeds = top["description"], top["seeds"]
    store = _resolve_path(top["store"], None, f"{where}: store")
    models = [_resolve_path(m, base, f"{where}: models") for m in top["models"]]

    raw_datasets = raw.get("datasets", {"rotten_tomatoes": {"source": "builtin:rotten_tomatoes"}})
    if not isinstance(raw_datasets, dict) or not raw_datasets:
        raise ConfigError(f"{where}: datasets: expected tables like [datasets.NAME] with a 'source' key")
    datasets = {}
    for dname, spec in raw_datasets.items():
        dwhere = f"{where}: datasets.{dname}"
        if isinstance(spec, str):
            spec = {"source": spec}
        _check_table(dwhere, spec, DATASET_FIELDS)
        if "source" not in spec:
            raise ConfigError(f"{dwhere}.source: missing (expected builtin:rotten_tomatoes, a hub id or a local path)")
        resolved = {"name": dname}
        for key, f in DATASET_FIELDS.items():
            resolved[key] = f.check(f"{dwhere}.{key}", spec.get(key, f.default))
        pair = resolved["text_pair_column"]
        if pair is not None and pair in (resolved["text_column"], resolved["label_column"]):
            other = "text_column" if pair == resolved["text_column"] else "label_column"
            raise ConfigError(f"{dwhere}.text_pair_column: {pair!r} is also the {other}; expected the column of "
                              f"the pair's second text")
        for key, default in DATASET_OMITTED_AT_DEFAULT.items():
            if resolved[key] == default:
                del resolved[key]
        resolved["source"] = _resolve_path(resolved["source"], base, f"{dwhere}.source")
        datasets[dname] = resolved

    raw_train = raw.get("train", {})
    _check_table(f"{where}: train", raw_train, TRAIN_FIELDS)
    train = {k: f.default for k, f in TRAIN_FIELDS.items()}
    for key, value in raw_train.items():
        train[key] = _train_setting(f"{where}: train", key, value)

    raw_report = raw.get("report", {})
    _check_table(f"{where}: report", raw_report, REPORT_FIELDS)
    report = {k: f.check(f"{where}: report.{k}", raw_report.get(k, f.default)) for k, f in REPORT_FIELDS.items()}

    tracking = _check_tracking(f"{where}: tracking", raw.get("tracking", {}))

    raw_arms = raw.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ConfigError(f"{where}: arms: expected at least one [[arms]] table with a 'method' key")
    arms = []
    for i, arm in enumerate(raw_arms):
        awhere = f"{where}: arms[{i}]"
        if not isinstance(arm, dict):
            raise ConfigError(f"{awhere}: expected a table, got {arm!r}")
        method = arm.get("method")
        if not isinstance(method, str) or method not in methods.METHODS:
            raise ConfigError(f"{awhere}.method: expected one of {', '.join(methods.METHODS)}, got {method!r}")
        spec = methods.METHODS[method]
        _check_table(awhere, arm, spec.params, ARM_FIXED_FIELDS | set(TRAIN_FIELDS))
        arm_name = check_value(f"{awhere}.name", "str?", arm.get("name"))
        for key, f in spec.params.items():  # a required parameter (llm's model) has no valid default
            if key not in arm:
                try:
                    spec.check(awhere, key, f.default)
                except ConfigError as e:
                    reason = str(e).removeprefix(f"{awhere}.{key}: ")
                    raise ConfigError(f"{awhere}.{key}: missing ({reason})") from None
        mparams, tparams = {}, {}
        for key, value in arm.items():
            if key in ARM_FIXED_FIELDS:
                continue
            if key in spec.params:
                if is_range(value):
                    raise ConfigError(f"{awhere}.{key}: a search range table is only for train settings "
                                      f"({', '.join(SEARCHABLE)}); {key} is a method parameter (give a list)")
                mparams[key] = _grid(awhere, key, value, lambda w, k, v: spec.check(w, k, v),
                                     list_valued=key in _list_keys(spec.params))
            else:
                tparams[key] = _train_setting(awhere, key, value)
        arms.append(Arm(method=method, name=arm_name, method_params=mparams, train=tparams))

    study = Study(name=name, path=path, store=store, seeds=seeds, models=models, datasets=datasets, train=train,
                  arms=arms, report=report, description=description, tracking=tracking)
    _check_search(where, raw.get("search"), study)
    if "reference" in raw_report:
        check_reference(f"{where}: report.reference", study)
    return study


def _check_search(where: str, raw_search: Any, study: Study) -> None:
    """The ``search`` table (sets ``study.search``), and its ranges: a range needs the table and the table a range;
    an arm with a range has no train list (grid) beside it."""
    if raw_search is None and not any(map(is_range, [*study.train.values(), *(v for a in study.arms
                                                                              for v in a.train.values())])):
        return  # no search: nothing to check (and nothing expanded)
    ranged = [run for run in expand_runs(study, searched=True) if any(map(is_range, run.train.values()))]
    if raw_search is None:
        if ranged:
            key = next(k for k, v in ranged[0].train.items() if is_range(v))
            raise ConfigError(f"{where}: arm '{ranged[0].arm}': {key} is a search range table, which needs a search "
                              f"table in the study (search = {{ trials = N }})")
        return
    swhere = f"{where}: search"
    _check_table(swhere, raw_search, SEARCH_FIELDS)
    if "trials" not in raw_search:
        raise ConfigError(f"{swhere}.trials: missing (expected the number of trials per arm, an integer >= 1)")
    search = {k: f.check(f"{swhere}.{k}", raw_search.get(k, f.default)) for k, f in SEARCH_FIELDS.items()}
    if not ranged:
        raise ConfigError(f"{swhere}: no arm has a train setting to search (give one as a range table, e.g. "
                          f"lr = {{ low = 1e-5, high = 1e-3, log = true }})")
    for i, arm in enumerate(study.arms):
        spec = methods.METHODS[arm.method]
        merged = spec.relevant_train({**study.train, **arm.train})
        if any(map(is_range, merged.values())):
            for key, value in merged.items():
                if isinstance(value, list):
                    at = f"{where}: arms[{i}].{key}" if key in arm.train else f"{where}: train.{key}"
                    raise ConfigError(f"{at}: a list (grid) in an arm with a search range; give its values as "
                                      f"{{ choices = [...] }} to search them")
    study.search = search


def check_reference(where: str, study: Study) -> None:
    """An explicit ``report.reference`` must name an arm: one of its labels, or a method of some arm (the rule of
    ``peftbench.report.tables.find_reference``)."""
    reference = study.report["reference"]
    names = {arm.method for arm in study.arms} | {run.arm for run in expand_runs(study, searched=True)}
    if reference not in names:
        raise ConfigError(f"{where}: {reference!r} names no arm (expected an arm label or method: "
                          f"{', '.join(sorted(names))})")


def _list_keys(fields: dict[str, Field]) -> set[str]:
    """Parameters whose single value is a list of names (target_modules, feedforward_modules, ...)."""
    return {k for k, f in fields.items() if f.list_valued}


def _grid(where: str, key: str, value: Any, check, list_valued: bool = False) -> Any:
    """A list is a grid axis (each item checked); a scalar is one value. List-valued fields (target_modules, ...) take a
    list of strings as one value and a list of lists as a grid."""
    if isinstance(value, list) and value and not (list_valued and _flat(value)):
        return [check(where, key, v) for v in value]
    return check(where, key, value)


def load_study(path: str | Path | None = None, overrides: list[str] | None = None) -> Study:
    """Read, override and validate a study file (default: the built-in demo study)."""
    path = Path(path) if path else DEFAULT_STUDY
    raw = read_study_file(path)
    raw = apply_overrides(raw, overrides or [])
    return validate_study(raw, path)


def _axes(values: dict[str, Any], list_keys: set[str] = frozenset()) -> list[dict[str, Any]]:
    keys = [k for k, v in values.items() if isinstance(v, list) and not (k in list_keys and _flat(v))]
    fixed = {k: v for k, v in values.items() if k not in keys}
    combos = itertools.product(*(values[k] for k in keys)) if keys else [()]
    return [{**fixed, **dict(zip(keys, combo))} for combo in combos], keys


def _flat(v: list) -> bool:
    return all(isinstance(x, str) for x in v)


def expand_runs(study: Study, searched: bool = False) -> list[RunConfig]:
    """Expand a study into its runs (deduplicated by run id, in a stable order).

    Runs with a train setting given as a search range are the search's (:mod:`peftbench.search` proposes their
    values): left out, unless ``searched``, which includes them as templates (their ``train`` holds the range tables;
    never run)."""
    runs: dict[str, RunConfig] = {}
    study_dir = str(study.path.parent.resolve()) if study.path else None
    for model in study.models:
        for dataset in study.datasets.values():
            for arm in study.arms:
                spec = methods.METHODS[arm.method]
                mgrid, mkeys = _axes(spec.resolve_defaults(arm.method_params), _list_keys(spec.params))
                tgrid, _ = _axes({**study.train, **arm.train})
                for mparams in mgrid:
                    mparams = spec.finalize(mparams)
                    label = spec.label(arm.name, mparams, mkeys)
                    for tparams in tgrid:
                        tparams = spec.relevant_train(tparams, mparams)
                        if not searched and any(map(is_range, tparams.values())):
                            continue
                        for seed in study.seeds:
                            run = RunConfig(study=study.name, arm=label, model=model, dataset=dataset,
                                            method=arm.method, method_params=mparams, train=tparams, seed=seed,
                                            study_dir=study_dir)
                            runs.setdefault(run.run_id, run)
    return list(runs.values())


def single_run_study(model: str, dataset: dict[str, Any], method: str, method_params: dict[str, Any],
                     train: dict[str, Any], seed: int, name: str = "train") -> Study:
    """The study behind ``peftbench train``: one arm, one seed, settings from flags."""
    raw = {"name": name, "models": [model], "datasets": {dataset.pop("name", "data"): dataset}, "seeds": [seed],
           "train": train, "arms": [{"method": method, **method_params}]}
    return validate_study(raw, None)


def _check_tracking(where: str, raw: Any) -> dict[str, Any]:
    """The ``[tracking]`` table: known tracker names, each once."""
    _check_table(where, raw, TRACKING_FIELDS)
    tracking = {k: f.check(f"{where}.{k}", raw.get(k, f.default)) for k, f in TRACKING_FIELDS.items()}
    tracking["report_to"] = list(dict.fromkeys(tracking["report_to"]))
    return tracking


def reference_markdown() -> str:
    """The study-file reference tables of the README, generated from the field specs (a test keeps them equal)."""
    parts = [reference_table("Top level", STUDY_TOP_FIELDS), reference_table("`[train]` (and any arm)", TRAIN_FIELDS),
             reference_table("`[datasets.NAME]`", DATASET_FIELDS), reference_table("`[report]`", REPORT_FIELDS),
             reference_table("`[tracking]`", TRACKING_FIELDS),
             reference_table("`[search]` (hyperparameter search through Optuna: docs/search.md)", SEARCH_FIELDS)]
    for name, method in methods.METHODS.items():
        if method.params:
            parts.append(reference_table(f"`method = \"{name}\"`: {method.doc}", method.params))
    others = ", ".join(f"`{n}` ({m.doc})" for n, m in methods.METHODS.items() if not m.params)
    parts.append(f"Methods without parameters: {others}.")
    return "\n\n".join(parts)

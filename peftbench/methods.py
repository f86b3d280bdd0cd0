"""Fine-tuning methods: the only module that branches on the method.

- ``full``: every parameter trains.
- ``frozen``: the pretrained encoder is frozen (and kept in eval mode: no dropout), only the classification head
  trains. Its encoder output can be computed once and reused every epoch (``train.cache_frozen_features``).
- ``lora``: peft LoRA adapters on ``target_modules`` (peft's own parameter names), the whole head trains too
  (``modules_to_save``: classifier *and* pooler / pre_classifier where the architecture has them).
- ``untrained``: nothing trains; the randomly initialised head is evaluated (the pre-fine-tuning baseline).
- ``tfidf`` and ``llm``: baselines that are not fine-tuned encoders (see ``peftbench.baselines``); they share the
  splits, metrics and store of every other run.

Example::

    >>> from peftbench import methods
    >>> sorted(methods.METHODS)
    ['frozen', 'full', 'llm', 'lora', 'tfidf', 'untrained']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftbench import baselines

# Default LoRA targets per architecture (model_type → nn.Linear leaf names): the attention query and value projections.
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "camembert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "albert": ["query", "value"],
    "mpnet": ["q", "v"],
    "modernbert": ["Wqkv"],
}

# Training settings that do not matter for a method that does not train (kept out of its run id).
EVAL_ONLY_TRAIN_KEYS = ("eval_batch_size", "max_length", "max_tokens_per_batch", "bf16", "pooling")


@dataclass
class Method:
    """A method's parameters (name → (kind, default, doc)) and how it turns a backbone into a trainable model."""

    name: str
    doc: str
    params: dict[str, tuple[Any, Any, str]] = field(default_factory=dict)
    trains: bool = True
    label_keys: tuple[str, ...] = ()
    prepare: Callable[..., nn.Module] | None = None

    def check(self, where: str, key: str, value: Any) -> Any:
        from peftbench.config import ConfigError, check_value

        kind, _, _ = self.params[key]
        value = check_value(f"{where}.{key}", kind, value)
        if self.name in baselines.BASELINE_PARAMS:
            try:
                return baselines.check_param(self.name, key, value)
            except ValueError as e:
                raise ConfigError(f"{where}.{key}: {e}") from None
        if key == "r" and value <= 0:
            raise ConfigError(f"{where}.r: expected a rank >= 1, got {value}")
        if key == "lora_alpha" and isinstance(value, str) and not re.fullmatch(r"\d*\.?\d*r", value):
            raise ConfigError(f"{where}.lora_alpha: expected an integer or a multiple of r such as '2r', got {value!r}")
        if key == "lora_alpha" and isinstance(value, int) and value <= 0:
            raise ConfigError(f"{where}.lora_alpha: expected a positive integer, got {value}")
        if key == "lora_dropout" and not 0 <= value < 1:
            raise ConfigError(f"{where}.lora_dropout: expected a probability in [0, 1), got {value}")
        if key == "bias" and value not in ("none", "all", "lora_only"):
            raise ConfigError(f"{where}.bias: expected one of none, all, lora_only, got {value!r}")
        if key == "init_lora_weights" and value not in ("true", "gaussian", "pissa", "olora"):
            raise ConfigError(f"{where}.init_lora_weights: expected one of true, gaussian, pissa, olora, got {value!r}")
        return value

    def resolve_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: params.get(k, default) for k, (_, default, _) in self.params.items()}

    def finalize(self, params: dict[str, Any]) -> dict[str, Any]:
        """Resolve relative values once the grid is expanded (``lora_alpha = '2r'`` → 2·r)."""
        params = dict(params)
        alpha = params.get("lora_alpha")
        if isinstance(alpha, str):
            factor = alpha[:-1]
            value = float(factor) * params["r"] if factor else float(params["r"])
            params["lora_alpha"] = int(value) if value == int(value) else value
        return params

    def label(self, name: str | None, params: dict[str, Any], grid_keys: list[str]) -> str:
        """Human label of an arm: its name (or method), then the rank and every other grid-swept parameter."""
        keys = [k for k in self.label_keys if k in params] + [k for k in grid_keys if k not in self.label_keys]
        bits = [f"{k}={params[k]}" for k in keys]
        flags = [k.removeprefix("use_") for k in ("use_dora", "use_rslora") if params.get(k)]
        init = params.get("init_lora_weights")
        if init not in (None, "true"):
            flags.append(init)
        base = name or ("+".join([self.name] + flags) if flags else self.name)
        return " ".join([base] + bits)

    def relevant_train(self, train: dict[str, Any]) -> dict[str, Any]:
        return dict(train) if self.trains else {k: train[k] for k in EVAL_ONLY_TRAIN_KEYS if k in train}


# --------------------------------------------------------------------------------------------------------------------
# Preparing a backbone for each method
# --------------------------------------------------------------------------------------------------------------------


def _head_parameters(model: nn.Module):
    from peftbench.models import HEAD_MODULES

    for name, module in model.named_modules():
        if name.split(".")[-1] in HEAD_MODULES:
            yield from module.parameters()


def _prepare_full(backbone, params) -> nn.Module:
    for p in backbone.model.parameters():
        p.requires_grad_(True)
    return backbone.model


def _prepare_frozen(backbone, params) -> nn.Module:
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in _head_parameters(model):
        p.requires_grad_(True)
    return model


def _prepare_untrained(backbone, params) -> nn.Module:
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    return backbone.model


def resolve_targets(backbone, requested: list[str] | str) -> list[str]:
    """``auto`` → the architecture's default; check every requested name matches some nn.Linear leaf."""
    from peftbench.models import linear_module_names

    valid = linear_module_names(backbone.model)
    if requested == "auto" or requested == ["auto"]:
        if backbone.model_type not in DEFAULT_TARGETS:
            raise ValueError(f"target_modules: no default for model type {backbone.model_type!r}; "
                             f"set it to some of: {', '.join(valid)}")
        return DEFAULT_TARGETS[backbone.model_type]
    missing = [t for t in requested if t not in valid]
    if missing:
        raise ValueError(f"target_modules: {', '.join(missing)} matches no linear layer of "
                         f"{backbone.model_type}; valid names: {', '.join(valid)}")
    return list(requested)


def lora_config(backbone, params):
    from peft import LoraConfig

    from peftbench.models import head_module_names

    init = params.get("init_lora_weights", "true")
    return LoraConfig(
        r=params["r"], lora_alpha=params["lora_alpha"], lora_dropout=params["lora_dropout"],
        target_modules=resolve_targets(backbone, params["target_modules"]), bias=params["bias"],
        use_dora=params.get("use_dora", False), use_rslora=params.get("use_rslora", False),
        init_lora_weights=True if init == "true" else init,
        modules_to_save=head_module_names(backbone.model),
    )


def _prepare_lora(backbone, params) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(backbone.model, lora_config(backbone, params))


LORA_PARAMS = {
    "r": (int, 8, "LoRA rank (peft `r`)"),
    "lora_alpha": ("int|str", "2r", "LoRA scaling numerator: an integer or a multiple of r such as '2r' (default 2r)"),
    "lora_dropout": (float, 0.1, "dropout on the LoRA branch input"),
    "target_modules": ("list[str]", "auto", "nn.Linear leaf names to adapt; auto = the architecture's query/value"),
    "bias": (str, "none", "which biases train: none, all or lora_only"),
    "use_dora": (bool, False, "DoRA: weight-decomposed low-rank adaptation (peft `use_dora`)"),
    "use_rslora": (bool, False, "rank-stabilised scaling alpha/sqrt(r) (peft `use_rslora`)"),
    "init_lora_weights": (str, "true", "initialisation: true (peft default), gaussian, pissa or olora"),
}

METHODS: dict[str, Method] = {
    "full": Method("full", "full fine-tuning: every parameter trains", prepare=_prepare_full),
    "frozen": Method("frozen", "frozen encoder, only the classification head trains", prepare=_prepare_frozen),
    "lora": Method("lora", "LoRA adapters through peft, plus the whole head", params=LORA_PARAMS,
                   label_keys=("r",), prepare=_prepare_lora),
    "untrained": Method("untrained", "no training: the freshly initialised head (pre-fine-tuning baseline)",
                        trains=False, prepare=_prepare_untrained),
    "tfidf": Method("tfidf", "TF-IDF + logistic regression (scikit-learn)", params=baselines.TFIDF_PARAMS,
                    trains=False),
    "llm": Method("llm", "a chat-completions model asked zero- or few-shot", params=baselines.LLM_PARAMS,
                  trains=False, label_keys=("model", "shots")),
}


def prepare(method: str, backbone, params: dict[str, Any]) -> nn.Module:
    """Return the model to train for ``method`` with exactly the right parameters requiring grad."""
    return METHODS[method].prepare(backbone, params)


def is_baseline(method: str) -> bool:
    """Methods without an encoder to fine-tune: they run through ``peftbench.baselines``."""
    return method in baselines.BASELINE_PARAMS


def uses_frozen_encoder(method: str) -> bool:
    """Methods whose encoder never changes: it runs in eval mode and its outputs may be cached."""
    return method in ("frozen", "untrained")


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts and weights on disk
# --------------------------------------------------------------------------------------------------------------------


def _is_head_param(name: str) -> bool:
    from peftbench.models import HEAD_MODULES

    parts = name.split(".")
    return "modules_to_save" in parts or any(p in HEAD_MODULES for p in parts[:-1])


def count_parameters(model: nn.Module, base_params: int) -> dict[str, Any]:
    """Exact counts: trainable = adapter + head; total = base model + head + adapter (peft's frozen copies of the
    head that ``modules_to_save`` keeps are not counted twice)."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head_all = sum(p.numel() for n, p in model.named_parameters()
                   if _is_head_param(n) and "original_module" not in n.split("."))
    head_trainable = sum(v for n, v in trainable.items() if _is_head_param(n))
    n_trainable = sum(trainable.values())
    encoder_trainable = n_trainable - head_trainable
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "magnitude" in n
                  or "ia3_" in n or "vera_" in n)
    head = head_all
    return {
        "base_model": base_params,
        "total": base_params + head + adapter,
        "trainable": n_trainable,
        "adapter": adapter,
        "head": head_trainable,
        "encoder_trainable": encoder_trainable - adapter,
        "trainable_pct": 100.0 * n_trainable / base_params,
    }


def save_weights(method: str, model: nn.Module, out_dir: Path) -> int:
    """Save what training changed; return its size in bytes. LoRA → ``adapter/`` (peft format, head included);
    other methods → ``model.safetensors`` with the trainable parameters (the head for frozen/untrained)."""
    if method == "lora":
        model.save_pretrained(out_dir / "adapter")
        files = list((out_dir / "adapter").glob("*"))
    else:
        names = [n for n, p in model.named_parameters() if p.requires_grad or _is_head_param(n)]
        state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in set(names)}
        save_file(state, out_dir / "model.safetensors")
        files = [out_dir / "model.safetensors"]
    return sum(f.stat().st_size for f in files if f.is_file())


def load_weights(method: str, backbone, run_dir: Path) -> nn.Module:
    """Rebuild a trained model from a run folder on top of a freshly loaded ``backbone``."""
    if method == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(backbone.model, run_dir / "adapter")
    state = load_file(run_dir / "model.safetensors")
    missing = set(state) - set(backbone.model.state_dict())
    if missing:
        raise ValueError(f"{run_dir}/model.safetensors: weights {sorted(missing)[:3]} do not fit the model")
    backbone.model.load_state_dict(state, strict=False)
    return backbone.model


def merge_for_inference(method: str, model: nn.Module) -> nn.Module:
    """LoRA weights merged into the base layers: prediction then costs what the plain model costs."""
    if method == "lora" and hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model

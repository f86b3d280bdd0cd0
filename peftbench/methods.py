"""Fine-tuning methods: the only module that branches on the method.

- ``full``: every parameter trains.
- ``frozen``: the pretrained encoder is frozen (and kept in eval mode: no dropout), only the classification head
  trains. Its encoder output can be computed once and reused every epoch (``train.cache_frozen_features``).
- ``lora``: peft LoRA adapters on ``target_modules`` (peft's own parameter names, or a preset: ``all-linear``,
  ``attention``, ``mlp``), the head trains too (``modules_to_save``; ``head = "all"``: classifier *and* pooler /
  pre_classifier where the architecture has them; ``head = "classifier"``: peft's default).
- ``loraplus``: LoRA trained with LoRA+ (peft's ``create_loraplus_optimizer``: B matrices at ``loraplus_lr_ratio``
  times the learning rate of A).
- ``adalora``: AdaLoRA (peft ``AdaLoraConfig``): SVD-shaped adapters whose ranks are reallocated during training by
  ``update_and_allocate``, called after every optimizer step; its orthogonal regulariser is added by the optimizer.
- ``ia3``: (IA)³ (peft ``IA3Config``): learned vectors rescaling keys, values and the feed-forward input.
- ``vera``: VeRA (peft ``VeraConfig``): frozen shared random projections, trainable scaling vectors per layer.
- ``untrained``: nothing trains; the randomly initialised head is evaluated (the pre-fine-tuning baseline).
- ``lstm``: no pretrained weights at all: a (Bi)LSTM classifier (``peftbench.lstm``) with embeddings learned from
  scratch over the study model's tokenizer vocabulary, trained by the same loop on the same token ids, splits,
  batches and seeds (the "LSTM from scratch" row of the IMDB comparison).
- ``majority``, ``tfidf`` and ``llm``: baselines that are not fine-tuned encoders (see ``peftbench.baselines``); they share the
  splits, metrics and store of every other run.

Example::

    >>> from peftbench import methods
    >>> sorted(methods.METHODS)
    ['adalora', 'frozen', 'full', 'ia3', 'llm', 'lora', 'loraplus', 'lstm', 'majority', 'tfidf', 'untrained', 'vera']
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
from peftbench.fields import ConfigError, check_value

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
    # decoders (AutoModelForSequenceClassification with a `score` head): the attention q/v projections
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

# (IA)³ defaults per architecture: (target_modules, feedforward_modules), peft's own defaults where peft has them.
# Names are suffixes of module paths (peft's matching rule), so "output.dense" is BERT's feed-forward output layer
# (and, as in peft's default, also the attention output projection "attention.output.dense").
DEFAULT_IA3_TARGETS = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "xlm-roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "electra": (["key", "value", "output.dense"], ["output.dense"]),
    "camembert": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "albert": (["key", "value", "ffn_output"], ["ffn_output"]),
    "mpnet": (["k", "v", "output.dense"], ["output.dense"]),
    "modernbert": (["Wqkv", "mlp.Wo"], ["mlp.Wo"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}

# Methods that go through peft: weights are saved with ``save_pretrained`` (``adapter/``, head included).
PEFT_METHODS = ("lora", "loraplus", "adalora", "ia3", "vera")

# Training settings that do not matter for a method that does not train (kept out of its run id).
EVAL_ONLY_TRAIN_KEYS = ("eval_batch_size", "max_length", "max_tokens_per_batch", "bf16", "pooling")

# Settings added after runs were stored: at these values they are left out of the run config (and so out of the run
# id), so every run stored before they existed keeps its id; code reads them with ``.get(key, default)``.
OMITTED_AT_DEFAULT = {"head": "all", "head_lr": None, "gradient_checkpointing": False, "bf16_weights": False,
                      "fast_dropout": False}

# ``target_modules`` presets besides explicit names (see ``resolve_targets``).
TARGET_PRESETS = ("auto", "all-linear", "attention", "mlp")


def _omit_defaults(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}


@dataclass
class Method:
    """A method's parameters (name → (kind, default, doc)) and how it turns a backbone into a trainable model."""

    name: str
    doc: str
    params: dict[str, tuple[Any, Any, str]] = field(default_factory=dict)
    trains: bool = True
    label_keys: tuple[str, ...] = ()
    prepare: Callable[..., nn.Module] | None = None
    exports: bool = True  # False: its model is no transformers model, so ``peftbench export`` refuses it

    def check(self, where: str, key: str, value: Any) -> Any:
        from peftbench.models import HEAD_POLICIES

        kind, _, _ = self.params[key]
        if key == "head" and isinstance(value, str):  # a policy; a list (of module names) is checked below
            if value not in HEAD_POLICIES:
                raise ConfigError(f"{where}.head: expected all, classifier or a list of module names, got {value!r}")
            return value
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
        if key in ("init_r", "target_r", "deltaT") and value < 1:
            raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {value}")
        if key in ("tinit", "tfinal") and value < 0:
            raise ConfigError(f"{where}.{key}: expected an integer >= 0, got {value}")
        if key in ("beta1", "beta2", "vera_dropout") and not 0 <= value < 1:
            raise ConfigError(f"{where}.{key}: expected a number in [0, 1), got {value}")
        if key in ("orth_reg_weight",) and value < 0:
            raise ConfigError(f"{where}.{key}: expected a number >= 0, got {value}")
        if key in ("embedding_dim", "hidden_size", "num_layers") and value < 1:
            raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {value}")
        if key == "pool" and self.name == "lstm" and value not in ("last", "mean"):
            raise ConfigError(f"{where}.pool: expected last or mean, got {value!r}")
        if key == "dropout" and not 0 <= value < 1:
            raise ConfigError(f"{where}.dropout: expected a probability in [0, 1), got {value}")
        if key == "loraplus_lr_ratio" and value <= 0:
            raise ConfigError(f"{where}.loraplus_lr_ratio: expected a positive ratio (LoRA+ uses >= 1), got {value}")
        return value

    def resolve_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every parameter with its default filled in (but those of ``OMITTED_AT_DEFAULT`` left out at it)."""
        return _omit_defaults({k: params.get(k, default) for k, (_, default, _) in self.params.items()})

    def finalize(self, params: dict[str, Any]) -> dict[str, Any]:
        """Resolve relative values once the grid is expanded (``lora_alpha = '2r'`` → 2·r)."""
        params = dict(params)
        alpha = params.get("lora_alpha")
        if isinstance(alpha, str):
            factor = alpha[:-1]
            r = params["r"] if "r" in params else params["init_r"]  # AdaLoRA: a multiple of its initial rank
            value = float(factor) * r if factor else float(r)
            params["lora_alpha"] = int(value) if value == int(value) else value
        if "target_r" in params and params["target_r"] >= params["init_r"]:
            raise ConfigError(f"{self.name}: target_r ({params['target_r']}) must be below init_r "
                              f"({params['init_r']}): AdaLoRA prunes from init_r down to target_r")
        return params

    def label(self, name: str | None, params: dict[str, Any], grid_keys: list[str]) -> str:
        """Human label of an arm: its name (or method), then the rank and every other grid-swept parameter."""
        keys = [k for k in self.label_keys if k in params] + [k for k in grid_keys if k not in self.label_keys]
        bits = [f"{k}={params[k]}" for k in keys]
        flags = [k.removeprefix("use_") for k in ("use_dora", "use_rslora") if params.get(k)]
        init = params.get("init_lora_weights")
        if init not in (None, "true"):
            flags.append(init)
        head = params.get("head", "all")
        if head != "all":  # shown unless the arm is named (two unnamed arms differing only in head stay apart)
            flags.append(f"head={head if isinstance(head, str) else ','.join(head)}")
        base = name or ("+".join([self.name] + flags) if flags else self.name)
        return " ".join([base] + bits)

    def relevant_train(self, train: dict[str, Any]) -> dict[str, Any]:
        """The training settings that enter the run (and its id)."""
        return _omit_defaults(train) if self.trains else {k: train[k] for k in EVAL_ONLY_TRAIN_KEYS if k in train}


# --------------------------------------------------------------------------------------------------------------------
# Preparing a backbone for each method
# --------------------------------------------------------------------------------------------------------------------


def resolve_head(backbone, params: dict[str, Any]) -> list[str]:
    """The head modules that train (peft ``modules_to_save`` names) under the arm's ``head`` policy."""
    from peftbench.models import head_module_names

    return head_module_names(backbone.model, params.get("head", "all"))


def head_parameter_names(model: nn.Module, head: list[str]) -> set[str]:
    """Names of the parameters inside the head modules ``head`` (peft's frozen original copies excluded)."""
    from peftbench.models import head_paths, in_paths

    paths = head_paths(model, head)
    return {n for n, _ in model.named_parameters() if in_paths(n, paths) and "original_module" not in n.split(".")}


def _prepare_full(backbone, params, **_) -> nn.Module:
    for p in backbone.model.parameters():
        p.requires_grad_(True)
    return backbone.model


def _prepare_frozen(backbone, params, **_) -> nn.Module:
    model = backbone.model
    head = head_parameter_names(model, resolve_head(backbone, params))
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
    return model


def _prepare_untrained(backbone, params, **_) -> nn.Module:
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    return backbone.model


def resolve_targets(backbone, requested: list[str] | str, head: str | list[str] = "all") -> list[str]:
    """The target names passed to peft (its suffix rule), from explicit names or a preset:

    - ``auto``: the architecture's default (``DEFAULT_TARGETS``: the attention query and value projections);
    - ``all-linear``: every linear layer outside the trained head and the output classifier (peft's meaning; so with
      ``head = "classifier"`` BERT's pooler dense layer is adapted, with ``head = "all"`` it trains whole instead);
    - ``attention``: the linear layers of the attention blocks (query, key, value and output projections);
    - ``mlp``: the linear layers of the feed-forward blocks.

    A preset resolves to the shortest names that select exactly its layers (``models.shortest_suffixes``). Explicit
    names must each match a linear layer and none inside the trained head. ValueError (one line) otherwise."""
    from peftbench.models import (PEFT_SEQ_CLS_HEAD, head_module_names, head_paths, is_attention, is_mlp,
                                  linear_paths, matches_target, shortest_suffixes)

    model = backbone.model
    requested = [requested] if isinstance(requested, str) else list(requested)
    head_modules = head_paths(model, head_module_names(model, head) + list(PEFT_SEQ_CLS_HEAD))
    linear = linear_paths(model, exclude=head_modules)
    leaves = ", ".join(sorted({n.split(".")[-1] for n in linear}))
    if len(requested) == 1 and requested[0] in TARGET_PRESETS:
        preset = requested[0]
        if preset == "auto":
            if backbone.model_type not in DEFAULT_TARGETS:
                raise ValueError(f"target_modules: no default for model type {backbone.model_type!r}; "
                                 f"set it to a preset ({', '.join(TARGET_PRESETS[1:])}) or some of: {leaves}")
            return DEFAULT_TARGETS[backbone.model_type]
        chosen = [n for n in linear if preset == "all-linear" or (is_attention if preset == "attention"
                                                                   else is_mlp)(n)]
        if not chosen:
            raise ValueError(f"target_modules: {preset} matches no linear layer of {backbone.model_type} "
                             f"(its linear layers end like: {leaves})")
        return shortest_suffixes(chosen, model)
    missing = [t for t in requested if not any(matches_target(n, t) for n in linear)]
    if missing:
        raise ValueError(f"target_modules: {', '.join(missing)} matches no linear layer of "
                         f"{backbone.model_type}; valid names: {leaves}")
    in_head = [(t, n) for t in requested for n, m in model.named_modules()
               if matches_target(n, t) and any(n == h or n.startswith(h + ".") for h in head_modules)]
    if in_head:
        t, n = in_head[0]
        instead = shortest_suffixes([m for m in linear if matches_target(m, t)], model)
        raise ValueError(f"target_modules: {t} also matches {n}, which is in the trained head (head = {head!r}); "
                         f"name the other layers by longer suffixes ({', '.join(instead)}), or use a preset")
    return requested


def lora_config(backbone, params):
    from peft import LoraConfig

    init = params.get("init_lora_weights", "true")
    return LoraConfig(
        r=params["r"], lora_alpha=params["lora_alpha"], lora_dropout=params["lora_dropout"],
        target_modules=_targets(backbone, params), bias=params["bias"],
        use_dora=params.get("use_dora", False), use_rslora=params.get("use_rslora", False),
        init_lora_weights=True if init == "true" else init,
        modules_to_save=resolve_head(backbone, params),
    )


def _targets(backbone, params) -> list[str]:
    return resolve_targets(backbone, params["target_modules"], params.get("head", "all"))


def _prepare_lora(backbone, params, **_) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(backbone.model, lora_config(backbone, params))


def _prepare_adalora(backbone, params, total_steps: int | None = None, **_) -> nn.Module:
    from peft import AdaLoraConfig, get_peft_model

    if not total_steps:
        raise ValueError("adalora: the number of training steps is needed for its rank budget schedule")
    config = AdaLoraConfig(
        init_r=params["init_r"], target_r=params["target_r"], lora_alpha=params["lora_alpha"],
        lora_dropout=params["lora_dropout"], target_modules=_targets(backbone, params),
        tinit=params["tinit"], tfinal=params["tfinal"], deltaT=params["deltaT"], beta1=params["beta1"],
        beta2=params["beta2"], orth_reg_weight=params["orth_reg_weight"], total_step=total_steps,
        modules_to_save=resolve_head(backbone, params),
    )
    return get_peft_model(backbone.model, config)


def resolve_ia3_targets(backbone, params) -> tuple[list[str], list[str]]:
    """(IA)³ ``target_modules`` and ``feedforward_modules``: ``auto`` → the architecture's default; names are
    suffixes of linear-layer paths (``output.dense``); the feed-forward ones must be among the targets."""
    from peftbench.models import linear_paths, matches_target

    linear = linear_paths(backbone.model)

    def matches(t: str) -> bool:
        return any(matches_target(n, t) for n in linear)

    def as_list(value):  # a study's single name arrives as a string (see docs/methods.md on lists of names)
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    targets, feedforward = as_list(params["target_modules"]), as_list(params["feedforward_modules"])
    default = DEFAULT_IA3_TARGETS.get(backbone.model_type)
    if targets in ("auto", ["auto"]):
        if default is None:
            raise ValueError(f"target_modules: no (IA)³ default for model type {backbone.model_type!r}; set it to "
                             f"suffixes of: {', '.join(sorted({n.split('.')[-1] for n in linear}))}")
        targets = default[0]
    missing = [t for t in targets if not matches(t)]
    if missing:
        raise ValueError(f"target_modules: {', '.join(missing)} matches no linear layer of {backbone.model_type}; "
                         f"valid names end like: {', '.join(sorted({n.split('.')[-1] for n in linear}))}")
    if feedforward in ("auto", ["auto"]):
        feedforward = [f for f in (default[1] if default else []) if f in targets]
    stray = [f for f in feedforward if f not in targets]
    if stray:
        raise ValueError(f"feedforward_modules: {', '.join(stray)} is not among target_modules")
    return list(targets), list(feedforward)


def _prepare_ia3(backbone, params, **_) -> nn.Module:
    from peft import IA3Config, get_peft_model

    targets, feedforward = resolve_ia3_targets(backbone, params)
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward,
                       modules_to_save=resolve_head(backbone, params))
    return get_peft_model(backbone.model, config)


def _prepare_vera(backbone, params, **_) -> nn.Module:
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(r=params["r"], target_modules=_targets(backbone, params),
                        projection_prng_key=params["projection_prng_key"], vera_dropout=params["vera_dropout"],
                        d_initial=params["d_initial"], modules_to_save=resolve_head(backbone, params))
    return get_peft_model(backbone.model, config)


def _prepare_lstm(backbone, params, **_) -> nn.Module:
    """A from-scratch (Bi)LSTM over the backbone's vocabulary (``config.vocab_size``: every id its tokenizer gives);
    the backbone's weights are not used. Every parameter trains."""
    from peftbench import lstm

    return lstm.build(backbone.model.config.vocab_size, backbone.num_labels, params)


HEAD_PARAM = ("list[str]", "all", "which head modules train: all (pooler / pre_classifier + classifier), classifier "
              "(peft's default modules_to_save: classifier / score by suffix, so DistilBERT's pre_classifier too, "
              "BERT's pooler not) or a list of module names")
TARGETS_PARAM = ("list[str]", "auto", "linear layers to adapt: names (peft suffixes) or a preset: auto (the "
                 "architecture's query/value), all-linear (every linear layer but the trained head), attention, mlp")

LORA_PARAMS = {
    "r": (int, 8, "LoRA rank (peft `r`)"),
    "lora_alpha": ("int|str", "2r", "LoRA scaling numerator: an integer or a multiple of r such as '2r' (default 2r)"),
    "lora_dropout": (float, 0.1, "dropout on the LoRA branch input"),
    "target_modules": TARGETS_PARAM,
    "bias": (str, "none", "which biases train: none, all or lora_only (peft `bias`)"),
    "use_dora": (bool, False, "DoRA: weight-decomposed low-rank adaptation (peft `use_dora`)"),
    "use_rslora": (bool, False, "rank-stabilised scaling alpha/sqrt(r) (peft `use_rslora`)"),
    "init_lora_weights": (str, "true", "initialisation: true (peft default), gaussian, pissa or olora"),
    "head": HEAD_PARAM,
}

LORAPLUS_PARAMS = {
    **LORA_PARAMS,
    "loraplus_lr_ratio": (float, 16.0, "LoRA+: learning rate of the B matrices / that of A (peft `loraplus_lr_ratio`)"),
}

ADALORA_PARAMS = {
    "init_r": (int, 12, "AdaLoRA: initial rank of every adapted matrix (peft `init_r`)"),
    "target_r": (int, 8, "AdaLoRA: average rank per matrix left after the budget schedule (peft `target_r`)"),
    "lora_alpha": ("int|str", "2r", "scaling numerator: an integer or a multiple of init_r such as '2r'"),
    "lora_dropout": (float, 0.1, "dropout on the adapter branch input"),
    "target_modules": TARGETS_PARAM,
    "tinit": (int, 0, "AdaLoRA: steps of initial warmup before ranks are pruned (peft `tinit`)"),
    "tfinal": (int, 0, "AdaLoRA: final steps with the rank allocation fixed (peft `tfinal`)"),
    "deltaT": (int, 1, "AdaLoRA: steps between two rank reallocations (peft `deltaT`)"),
    "beta1": (float, 0.85, "AdaLoRA: EMA factor of the sensitivity (peft `beta1`)"),
    "beta2": (float, 0.85, "AdaLoRA: EMA factor of the uncertainty (peft `beta2`)"),
    "orth_reg_weight": (float, 0.5, "AdaLoRA: weight of the orthogonal regulariser of A and B (peft `orth_reg_weight`)"),
    "head": HEAD_PARAM,
}

IA3_PARAMS = {
    "target_modules": ("list[str]", "auto", "(IA)³: suffixes of the linear layers to rescale; auto = keys, values and "
                       "the feed-forward output layer"),
    "feedforward_modules": ("list[str]", "auto", "(IA)³: targets whose input (not output) is rescaled; auto = the "
                            "architecture's feed-forward layers among target_modules"),
    "head": HEAD_PARAM,
}

VERA_PARAMS = {
    "r": (int, 256, "VeRA: rank of the shared frozen random projections (peft `r`)"),
    "target_modules": TARGETS_PARAM,
    "projection_prng_key": (int, 0, "VeRA: seed of the shared random projections (peft `projection_prng_key`)"),
    "vera_dropout": (float, 0.0, "VeRA: dropout on the adapter branch input (peft `vera_dropout`)"),
    "d_initial": (float, 0.1, "VeRA: initial value of the d scaling vector (peft `d_initial`)"),
    "head": HEAD_PARAM,
}

LSTM_PARAMS = {
    "embedding_dim": (int, 128, "LSTM: size of the token embeddings, learned from scratch over the model's tokenizer "
                      "vocabulary"),
    "hidden_size": (int, 128, "LSTM: hidden state size per direction"),
    "num_layers": (int, 1, "LSTM: stacked recurrent layers"),
    "dropout": (float, 0.2, "LSTM: dropout on the embeddings, between stacked layers and before the classifier"),
    "bidirectional": (bool, True, "LSTM: read the text both ways (the classifier sees both directions)"),
    "pool": (str, "mean", "LSTM: text vector from the top layer: mean (its outputs averaged over the real tokens) or "
             "last (its final states, both directions)"),
}

FULL_PARAMS = {"head": ("list[str]", "all", "every parameter trains; which modules count as the head (and take "
                        "train.head_lr): all, classifier or a list of module names")}
FROZEN_PARAMS = {"head": HEAD_PARAM}

METHODS: dict[str, Method] = {
    "full": Method("full", "full fine-tuning: every parameter trains", params=FULL_PARAMS, prepare=_prepare_full),
    "frozen": Method("frozen", "frozen encoder, only the classification head trains", params=FROZEN_PARAMS,
                     prepare=_prepare_frozen),
    "lora": Method("lora", "LoRA adapters through peft, plus the whole head", params=LORA_PARAMS,
                   label_keys=("r",), prepare=_prepare_lora),
    "loraplus": Method("loraplus", "LoRA with LoRA+ learning rates (B at loraplus_lr_ratio x lr), plus the head",
                       params=LORAPLUS_PARAMS, label_keys=("r",), prepare=_prepare_lora),
    "adalora": Method("adalora", "AdaLoRA: adaptive per-matrix ranks through peft, plus the whole head",
                      params=ADALORA_PARAMS, label_keys=("target_r",), prepare=_prepare_adalora),
    "ia3": Method("ia3", "(IA)³: learned rescaling vectors through peft, plus the whole head", params=IA3_PARAMS,
                  prepare=_prepare_ia3),
    "vera": Method("vera", "VeRA: shared random projections with trained scaling vectors, plus the whole head",
                   params=VERA_PARAMS, label_keys=("r",), prepare=_prepare_vera),
    "lstm": Method("lstm", "a (Bi)LSTM trained from scratch over the model's tokenizer vocabulary (no pretrained "
                   "weights)", params=LSTM_PARAMS, prepare=_prepare_lstm, exports=False),
    "untrained": Method("untrained", "no training: the freshly initialised head (pre-fine-tuning baseline)",
                        trains=False, prepare=_prepare_untrained),
    "majority": Method("majority", "always the training split's most frequent class (the floor to clear)",
                       trains=False),
    "tfidf": Method("tfidf", "TF-IDF + logistic regression (scikit-learn)", params=baselines.TFIDF_PARAMS,
                    trains=False),
    "llm": Method("llm", "a chat-completions model asked zero- or few-shot", params=baselines.LLM_PARAMS,
                  trains=False, label_keys=("model", "shots")),
}


def prepare(method: str, backbone, params: dict[str, Any], total_steps: int | None = None) -> nn.Module:
    """Return the model to train for ``method`` with exactly the right parameters requiring grad.

    ``total_steps`` (optimizer steps of the whole training) is needed by ``adalora``'s rank budget schedule."""
    return METHODS[method].prepare(backbone, params, total_steps=total_steps)


def hold_frozen_in_bf16(model: nn.Module) -> int:
    """Cast every parameter that does not train to bfloat16 in place (once, instead of autocast re-casting it at
    every step); trainable parameters stay fp32. Returns how many parameters were cast. Only under bf16 autocast:
    without it fp32 activations would meet bf16 weights."""
    cast = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
                cast += p.numel()
    return cast


def is_peft(method: str) -> bool:
    """Methods built with peft: saved as ``adapter/`` with ``save_pretrained``, mergeable into the base weights."""
    return method in PEFT_METHODS


def is_baseline(method: str) -> bool:
    """Methods without an encoder to fine-tune: they run through ``peftbench.baselines``."""
    return method in baselines.BASELINE_PARAMS


def uses_frozen_encoder(method: str) -> bool:
    """Methods whose encoder never changes: it runs in eval mode and its outputs may be cached."""
    return method in ("frozen", "untrained")


# --------------------------------------------------------------------------------------------------------------------
# Method-specific training: an optimizer of its own (LoRA+, AdaLoRA) and a hook after each step (AdaLoRA)
# --------------------------------------------------------------------------------------------------------------------


def adalora_orth_reg(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonal regulariser, as peft computes it inside its forward when labels are passed: the mean over
    adapted matrices of ||A·Aᵀ − I||_F (A: r × d_in) and ||Bᵀ·B − I||_F (B: d_out × r)."""
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=p.device, dtype=p.dtype)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class OrthRegAdamW(torch.optim.AdamW):
    """AdamW that first adds the gradient of ``weight`` × AdaLoRA's orthogonal regulariser to the gradients.

    peft adds the regulariser to ``outputs.loss`` only when labels go through the model; peftbench's loop computes
    the same cross-entropy for every method from the logits, so the regulariser's gradient is added here instead:
    the update is that of loss + weight · R, except that gradient clipping sees the task gradient only.
    """

    def __init__(self, params, *, model: nn.Module, orth_reg_weight: float, **kwargs):
        super().__init__(params, **kwargs)
        self.model, self.orth_reg_weight = model, orth_reg_weight

    def step(self, closure=None):
        if self.orth_reg_weight > 0:
            with torch.enable_grad():
                (self.orth_reg_weight * adalora_orth_reg(self.model)).backward()
        return super().step(closure)


def make_optimizer(method: str, model: nn.Module, params: dict[str, Any], train: dict[str, Any],
                   device: torch.device, head: list[str] | None = None) -> torch.optim.Optimizer:
    """The run's optimizer: the method's own, or the training loop's AdamW (``engine.make_optimizer``).

    - ``loraplus``: peft's ``create_loraplus_optimizer`` (AdamW; B matrices, and as in peft every 1-D parameter such
      as biases, at ``loraplus_lr_ratio`` × lr; weight decay as ``train.weight_decay``).
    - ``adalora``: AdamW with the orthogonal regulariser's gradient added (``OrthRegAdamW``).

    All use the fused AdamW kernel as the loop's own optimizer does (``train.fused_optimizer``). With
    ``train.head_lr`` set, the trainable parameters of the head modules ``head`` (``resolve_head``) get that learning
    rate instead, each keeping its group's other settings (``engine.set_group_lr``; with LoRA+ the head's biases then
    leave the fast group too).
    """
    from peftbench.engine import fused_adamw_available, param_groups, set_group_lr
    from peftbench.engine import make_optimizer as adamw

    fused = train.get("fused_optimizer", True) and fused_adamw_available(device)
    if method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=train["lr"],
                                              loraplus_lr_ratio=params["loraplus_lr_ratio"],
                                              loraplus_weight_decay=train["weight_decay"], fused=fused)
    elif method == "adalora":
        optimizer = OrthRegAdamW(param_groups(model, train["weight_decay"]), model=model,
                                 orth_reg_weight=params["orth_reg_weight"], lr=train["lr"], fused=fused)
    else:
        optimizer = adamw(model, train["lr"], train["weight_decay"], device, train.get("fused_optimizer", True))
    if train.get("head_lr") is not None:
        names = head_parameter_names(model, head if head is not None else [])
        set_group_lr(optimizer, [p for n, p in model.named_parameters() if n in names and p.requires_grad],
                     train["head_lr"])
    return optimizer


def step_hook(method: str, model: nn.Module, params: dict[str, Any]) -> Callable[[int], None] | None:
    """Called after each optimizer step (before the gradients are cleared): AdaLoRA's rank reallocation."""
    if method == "adalora":
        return model.base_model.update_and_allocate
    return None


def spectrum_targets(method: str, backbone, params: dict[str, Any]) -> list[str] | None:
    """Module names (suffixes) whose learned update ``peftbench.spectrum`` analyses: the adapted matrices, or for
    ``full`` the architecture's default LoRA targets (query/value), so both are compared on the same matrices.
    None for methods that leave the encoder unchanged."""
    if method == "full":
        return DEFAULT_TARGETS.get(backbone.model_type)
    if method == "ia3":
        return resolve_ia3_targets(backbone, params)[0]
    if is_peft(method):
        return _targets(backbone, params)
    return None


def resolved_names(method: str, backbone, params: dict[str, Any]) -> dict[str, list[str]]:
    """What the arm's names and presets resolve to on this model: ``head`` (the modules that train as the head, peft
    ``modules_to_save`` names) and, for peft methods, ``target_modules`` (and (IA)³'s ``feedforward_modules``).
    Stored in the run's ``result.json`` under ``resolved`` (``config.json`` keeps the settings as written: it is
    what the run id hashes). ValueError (one line) when a name or preset fits nothing."""
    out: dict[str, list[str]] = {}
    if is_baseline(method):
        return out
    if method == "lstm":  # its own model, whose head is its linear classifier
        from peftbench.lstm import HEAD

        return {"head": list(HEAD)}
    out["head"] = resolve_head(backbone, params)
    if method == "ia3":
        out["target_modules"], out["feedforward_modules"] = resolve_ia3_targets(backbone, params)
    elif is_peft(method):
        out["target_modules"] = _targets(backbone, params)
    return out


def check_model_params(config, method: str, params: dict[str, Any], pooling: str = "auto", path: str = "",
                       where: str = "") -> dict[str, list[str]]:
    """Validation-time check of an arm's head and target names against a model's transformers ``config``: the model
    is built on the meta device (no weights needed). Returns ``resolved_names``; raises ConfigError naming
    ``where``'s field (``"<where>.target_modules: ..."``)."""
    from peftbench.fields import ConfigError
    from peftbench.models import classifier_from_config

    if is_baseline(method):
        return {}
    backbone = classifier_from_config(config, 2, pooling, path=path, weights=False)
    try:
        return resolved_names(method, backbone, params)
    except ValueError as e:
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts and weights on disk
# --------------------------------------------------------------------------------------------------------------------


def _is_head_param(name: str) -> bool:
    from peftbench.models import HEAD_MODULES

    parts = name.split(".")
    return "modules_to_save" in parts or any(p in HEAD_MODULES for p in parts[:-1])


# Parameter names peft gives adapter weights (LoRA A/B/E, DoRA magnitudes, (IA)³ vectors, VeRA scalings).
ADAPTER_KEYS = ("lora_", "magnitude", "ia3_", "vera_")


def count_parameters(model: nn.Module, head: list[str]) -> dict[str, Any]:
    """Exact counts of a prepared model whose trained head modules are ``head`` (``resolve_head``):

    - ``total``: every parameter once (peft's frozen original copy of the head not counted twice);
    - ``base_model`` = total − head − adapter: the pretrained model outside the trained head (BERT's pooler is in it
      under ``head = "classifier"``);
    - ``trainable_pct`` = 100 · trainable / total (peft's "trainable%", at most 100);
    - ``trainable`` = ``adapter`` + ``head`` (trainable head parameters) + ``encoder_trainable`` (e.g. biases under
      ``bias = "lora_only"``, everything for full fine-tuning);
    - ``total_with_head_copy``: the total as peft's ``print_trainable_parameters`` reports it ("all params": the head's
      frozen original copy counted too), for comparison with published peft figures.
    """
    named = dict(model.named_parameters())
    in_head = head_parameter_names(model, head)
    trainable = {n: p.numel() for n, p in named.items() if p.requires_grad}
    total = sum(p.numel() for n, p in named.items() if "original_module" not in n.split("."))
    head_all = sum(named[n].numel() for n in in_head)
    head_trainable = sum(v for n, v in trainable.items() if n in in_head)
    adapter = sum(p.numel() for n, p in named.items() if any(k in n for k in ADAPTER_KEYS))
    n_trainable = sum(trainable.values())
    base = total - head_all - adapter
    return {
        "base_model": base,
        "total": total,
        "total_with_head_copy": sum(p.numel() for p in named.values()),
        "trainable": n_trainable,
        "adapter": adapter,
        "head": head_trainable,
        "encoder_trainable": n_trainable - head_trainable - adapter,
        # peft's "trainable%": of all parameters of the model being trained (base + head + adapter), so at most 100
        "trainable_pct": 100.0 * n_trainable / total,
    }


def describe_adapter(model: nn.Module, base_model: str) -> None:
    """Make a peft model's ``adapter_config.json`` self-describing before it is saved: ``base_model_name_or_path`` =
    ``base_model`` (give it :func:`peftbench.models.portable_model_id`) and, for a transformers classification head,
    ``task_type = "SEQ_CLS"``, so ``AutoPeftModelForSequenceClassification.from_pretrained(adapter)`` rebuilds the run's
    model. A mean-pooling classifier (:class:`peftbench.models.MeanPoolClassifier`) keeps ``task_type`` unset: peft
    then records the class in ``auto_mapping`` and ``AutoPeftModelForSequenceClassification`` refuses it (a BERT
    classifier on [CLS] would be a different model) instead of loading it wrongly."""
    from peftbench.models import MeanPoolClassifier

    config = model.peft_config[model.active_adapter]
    config.base_model_name_or_path = base_model
    config.task_type = None if isinstance(model.get_base_model(), MeanPoolClassifier) else "SEQ_CLS"


def save_weights(method: str, model: nn.Module, out_dir: Path, base_model: str | None = None) -> int:
    """Save what training changed; return its size in bytes. peft methods → ``adapter/`` (peft format, head
    included, described for the hub by :func:`describe_adapter` when ``base_model`` is given); other methods →
    ``model.safetensors`` with the trainable parameters (the head for frozen/untrained).

    AdaLoRA: the rank pattern of the last allocation is applied to the model first (peft saves only the kept ranks,
    and the best epoch restored by the loop may predate the last pruning), so what is evaluated is what is saved."""
    if method == "adalora" and model.peft_config["default"].rank_pattern:
        base = model.base_model
        base.rankallocator.mask_using_rank_pattern(base.model, model.peft_config["default"].rank_pattern)
    if is_peft(method):
        if base_model is not None:
            describe_adapter(model, base_model)
        # save_embedding_layers="auto" would look the (hub id of the) base model up online to see whether its vocabulary
        # changed: peftbench never resizes it, and a run must never wait on the network
        model.save_pretrained(out_dir / "adapter", save_embedding_layers=False)
        files = list((out_dir / "adapter").glob("*"))
    else:
        names = [n for n, p in model.named_parameters() if p.requires_grad or _is_head_param(n)]
        state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in set(names)}
        save_file(state, out_dir / "model.safetensors")
        files = [out_dir / "model.safetensors"]
    return sum(f.stat().st_size for f in files if f.is_file())


def load_weights(method: str, backbone, run_dir: Path, params: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild a trained model from a run folder on top of a freshly loaded ``backbone`` (``params``: the run's
    method parameters, which ``lstm`` needs to rebuild its own model)."""
    if is_peft(method):
        from peft import PeftModel

        from peftbench.models import require_safetensors

        require_safetensors(run_dir / "adapter")  # peft would fall back to a pickled adapter_model.bin
        return PeftModel.from_pretrained(backbone.model, run_dir / "adapter")
    state = load_file(run_dir / "model.safetensors")
    if method == "lstm":  # its own model, rebuilt from the run's parameters (defaults for any left out)
        model = prepare(method, backbone, METHODS[method].resolve_defaults(params or {}))
    else:
        model = backbone.model
    missing = set(state) - set(model.state_dict())
    if missing:
        raise ValueError(f"{run_dir}/model.safetensors: weights {sorted(missing)[:3]} do not fit the model")
    model.load_state_dict(state, strict=method == "lstm")  # an lstm run saved every weight
    return model


def merge_for_inference(method: str, model: nn.Module) -> nn.Module:
    """Adapter weights merged into the base layers: prediction then costs what the plain model costs.

    The trained head copies (peft's ``modules_to_save`` wrappers) are put in place first: peft 0.21's VeRA and (IA)³
    unloading assume every wrapped module has a ``weight``, which BERT's pooler has not."""
    if is_peft(method) and hasattr(model, "merge_and_unload"):
        from peft.utils import ModulesToSaveWrapper

        for name, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, module.modules_to_save[module.active_adapters[0]])
        return model.merge_and_unload()
    return model

"""Fine-tuning methods as plugins: the only package that knows one method from another.

Each method is a small :class:`Method` subclass (``peftbench.methods.base``) registered in :data:`METHODS` under its
name; it owns its parameter schema, checks and labels, model preparation, optimizer and step hook, adapter and head
parameters, weights on disk, merging for inference, spectrum targets and its place in the report. The families:

- :mod:`peftbench.methods.encoder`: ``full``, ``frozen``, ``untrained`` and ``lstm`` (no adapter);
- :mod:`peftbench.methods.peft_methods`: the peft tuners ``lora``, ``loraplus``, ``adalora``, ``ia3``, ``vera``;
- :mod:`peftbench.methods.baseline_arms`: ``majority``, ``tfidf`` and ``llm`` (no encoder to fine-tune, see
  ``peftbench.baselines``).

The functions below take a method's name and ask its plugin; code elsewhere calls them (or reads the plugin's
attributes, ``METHODS[name].trains``) and never compares method names. Adding a method: docs/design.md, "How to add a
method".

Example::

    >>> from peftbench import methods
    >>> sorted(methods.METHODS)
    ['adalora', 'frozen', 'full', 'ia3', 'llm', 'lora', 'loraplus', 'lstm', 'majority', 'tfidf', 'untrained', 'vera']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftbench.fields import ConfigError
from peftbench.methods.base import (EVAL_ONLY_TRAIN_KEYS, OMITTED_AT_DEFAULT, Method, count_parameters,
                                    head_parameter_names, resolve_head)
from peftbench.methods.baseline_arms import Llm, Majority, Tfidf
from peftbench.methods.encoder import Frozen, Full, Lstm, Untrained
from peftbench.methods.peft_methods import (DEFAULT_IA3_TARGETS, DEFAULT_TARGETS, LORA_PARAMS, TARGET_PRESETS,
                                            IA3, AdaLora, Lora, LoraPlus, OrthRegAdamW, PeftMethod, Vera,
                                            adalora_orth_reg, describe_adapter, resolve_ia3_targets,
                                            resolve_targets)

__all__ = ["METHODS", "Method", "PeftMethod", "register", "prepare", "make_optimizer", "step_hook", "spectrum_targets",
           "resolved_names", "check_model_params", "count_parameters", "save_weights", "load_weights",
           "merge_for_inference", "run_baseline", "is_peft", "is_baseline", "uses_frozen_encoder", "order",
           "with_role", "plot_lines", "in_cost_plot", "on_params_axis", "resolve_head", "head_parameter_names", "resolve_targets",
           "resolve_ia3_targets", "describe_adapter", "hold_frozen_in_bf16", "adalora_orth_reg", "OrthRegAdamW",
           "DEFAULT_TARGETS", "DEFAULT_IA3_TARGETS", "TARGET_PRESETS", "LORA_PARAMS", "EVAL_ONLY_TRAIN_KEYS",
           "OMITTED_AT_DEFAULT"]

# name → method, in the order of the README's reference and of error messages.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under its name (a study can then use it); returns it."""
    if not method.name:
        raise ValueError(f"{type(method).__name__}: a method needs a name")
    METHODS[method.name] = method
    return method


for _method in (Full(), Frozen(), Lora(), LoraPlus(), AdaLora(), IA3(), Vera(), Lstm(), Untrained(), Majority(),
                Tfidf(), Llm()):
    register(_method)

# Methods that go through peft (those registered with the package; a later one: ``METHODS[name].peft``).
PEFT_METHODS = tuple(name for name, m in METHODS.items() if m.peft)


# --------------------------------------------------------------------------------------------------------------------
# What a method is (read by the runner, executors, export and the report)
# --------------------------------------------------------------------------------------------------------------------


def is_peft(method: str) -> bool:
    """Methods built with peft: saved as ``adapter/`` with ``save_pretrained``, mergeable into the base weights."""
    return METHODS[method].peft


def is_baseline(method: str) -> bool:
    """Methods without an encoder to fine-tune: they run through :func:`run_baseline`."""
    return METHODS[method].baseline


def uses_frozen_encoder(method: str) -> bool:
    """Methods whose encoder never changes: it runs in eval mode and its outputs may be cached."""
    return METHODS[method].frozen_encoder


def order(method: Any) -> float:
    """Place of a method's arms in the report's tables (baselines first, full fine-tuning last, unknown in between)."""
    return METHODS[method].order if method in METHODS else Method.order


def with_role(role: str) -> list[str]:
    """The methods the report uses for ``role`` (``floor``, ``untrained``, ``adapter``; see :class:`Method`)."""
    return [name for name, m in METHODS.items() if m.role == role]


def plot_lines() -> dict[str, tuple[str, str, str]]:
    """method → (label, colour, line style) of the reference lines the report's plots draw."""
    return {name: m.plot_line for name, m in METHODS.items() if m.plot_line}


def in_cost_plot(method: Any) -> bool:
    """Whether a method's arms appear in the report's training-cost plot."""
    return METHODS[method].cost_plot if method in METHODS else True


def on_params_axis(method: Any) -> bool:
    """Whether a method's arms are points on the report's metric-vs-trainable-parameters plot (else reference lines)."""
    return METHODS[method].params_axis if method in METHODS else True


# --------------------------------------------------------------------------------------------------------------------
# A run's model, by method name
# --------------------------------------------------------------------------------------------------------------------


def prepare(method: str, backbone, params: dict[str, Any], total_steps: int | None = None) -> nn.Module:
    """Return the model to train for ``method`` with exactly the right parameters requiring grad.

    ``total_steps`` (optimizer steps of the whole training) is needed by ``adalora``'s rank budget schedule."""
    return METHODS[method].prepare(backbone, params, total_steps=total_steps)


def make_optimizer(method: str, model: nn.Module, params: dict[str, Any], train: dict[str, Any],
                   device: torch.device, head: list[str] | None = None) -> torch.optim.Optimizer:
    """The run's optimizer: the method's own (LoRA+, AdaLoRA) or the training loop's AdamW, all with the fused
    AdamW kernel as the loop's own optimizer has (``train.fused_optimizer``). With ``train.head_lr`` set, the trainable
    parameters of the head modules ``head`` (``resolve_head``) get that learning rate instead, each keeping its
    group's other settings (``engine.set_group_lr``; with LoRA+ the head's biases then leave the fast group too)."""
    from peftbench.engine import set_group_lr

    optimizer = METHODS[method].make_optimizer(model, params, train, device)
    if train.get("head_lr") is not None:
        names = head_parameter_names(model, head if head is not None else [])
        set_group_lr(optimizer, [p for n, p in model.named_parameters() if n in names and p.requires_grad],
                     train["head_lr"])
    return optimizer


def step_hook(method: str, model: nn.Module, params: dict[str, Any]) -> Callable[[int], None] | None:
    """Called after each optimizer step (before the gradients are cleared): AdaLoRA's rank reallocation."""
    return METHODS[method].step_hook(model, params)


def spectrum_targets(method: str, backbone, params: dict[str, Any]) -> list[str] | None:
    """Module names (suffixes) whose learned update ``peftbench.spectrum`` analyses: the adapted matrices, or for
    ``full`` the architecture's default LoRA targets (query/value), so both are compared on the same matrices.
    None for methods that leave the encoder unchanged."""
    return METHODS[method].spectrum_targets(backbone, params)


def resolved_names(method: str, backbone, params: dict[str, Any]) -> dict[str, list[str]]:
    """What the arm's names and presets resolve to on this model: ``head`` (the modules that train as the head, peft
    ``modules_to_save`` names) and, for peft methods, ``target_modules`` (and (IA)³'s ``feedforward_modules``).
    Stored in the run's ``result.json`` under ``resolved`` (``config.json`` keeps the settings as written: it is
    what the run id hashes). ValueError (one line) when a name or preset fits nothing."""
    return METHODS[method].resolved_names(backbone, params)


def check_model_params(config, method: str, params: dict[str, Any], pooling: str = "auto", path: str = "",
                       where: str = "") -> dict[str, list[str]]:
    """Validation-time check of an arm's head and target names against a model's transformers ``config``: the model
    is built on the meta device (no weights needed). Returns ``resolved_names``; raises ConfigError naming
    ``where``'s field (``"<where>.target_modules: ..."``)."""
    from peftbench.models import classifier_from_config

    if METHODS[method].baseline:
        return {}
    backbone = classifier_from_config(config, 2, pooling, path=path, weights=False)
    try:
        return resolved_names(method, backbone, params)
    except ValueError as e:
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def save_weights(method: str, model: nn.Module, out_dir: Path, base_model: str | None = None) -> int:
    """Save what training changed; return its size in bytes. peft methods → ``adapter/`` (peft format, head
    included, described for the hub by :func:`describe_adapter` when ``base_model`` is given); other methods →
    ``model.safetensors`` with the trainable parameters (the head for frozen/untrained)."""
    return METHODS[method].save_weights(model, out_dir, base_model)


def load_weights(method: str, backbone, run_dir: Path, params: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild a trained model from a run folder on top of a freshly loaded ``backbone`` (``params``: the run's
    method parameters, which ``lstm`` needs to rebuild its own model)."""
    return METHODS[method].load_weights(backbone, run_dir, params)


def merge_for_inference(method: str, model: nn.Module) -> nn.Module:
    """Adapter weights merged into the base layers: prediction then costs what the plain model costs."""
    return METHODS[method].merge_for_inference(model)


def run_baseline(method: str, params: dict[str, Any], splits, seed: int, cache_dir: Path):
    """Fit / query a baseline on ``splits`` and predict validation (tfidf) and test (``peftbench.baselines``); its
    parameters' defaults are filled in. ``cache_dir`` holds the LLM response cache (``cache_dir/llm/``)."""
    spec = METHODS[method]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(f"{method}: unknown setting {unknown[0]!r} (expected one of {', '.join(spec.params)})")
    return spec.run_baseline({k: params.get(k, f.default) for k, f in spec.params.items()}, splits, seed, cache_dir)


def packs(method: str, params: dict[str, Any], train: dict[str, Any]) -> bool:
    """Whether a run of ``method`` with ``params`` and ``train`` may share a forward pass (:mod:`peftbench.packing`)."""
    return method in METHODS and METHODS[method].packs(params, train)


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

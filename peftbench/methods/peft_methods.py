"""peft tuners: ``lora``, ``loraplus``, ``adalora``, ``ia3``, ``vera``; one small class each over :class:`PeftMethod`.

- ``lora``: peft LoRA adapters on ``target_modules`` (peft's own parameter names, or a preset: ``all-linear``,
  ``attention``, ``mlp``), the head trains too (``modules_to_save``; ``head = "all"``: classifier *and* pooler /
  pre_classifier where the architecture has them; ``head = "classifier"``: peft's default).
- ``loraplus``: LoRA trained with LoRA+ (peft's ``create_loraplus_optimizer``: B matrices at ``loraplus_lr_ratio``
  times the learning rate of A).
- ``adalora``: AdaLoRA (peft ``AdaLoraConfig``): SVD-shaped adapters whose ranks are reallocated during training by
  ``update_and_allocate``, called after every optimizer step; its orthogonal regulariser is added by the optimizer.
- ``ia3``: (IA)³ (peft ``IA3Config``): learned vectors rescaling keys, values and the feed-forward input.
- ``vera``: VeRA (peft ``VeraConfig``): frozen shared random projections, trainable scaling vectors per layer.

A :class:`PeftMethod` saves with ``save_pretrained`` (``adapter/``, head included through ``modules_to_save``), loads
with ``PeftModel.from_pretrained``, merges with ``merge_and_unload``, counts as adapter what peft's tuner layers hold,
and has its spectrum read on its resolved target modules. A new tuner is a subclass that sets ``name``, ``doc``,
``params`` and ``peft_config`` (docs/design.md, "How to add a method").

Example::

    >>> from peftbench.methods import METHODS
    >>> METHODS["lora"].finalize({"r": 4, "lora_alpha": "2r"})["lora_alpha"]
    8
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.fields import ConfigError, Field, by_name, check_value
from peftbench.methods.base import Method, head_field, peft_adapter_names, resolve_head

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


# ``target_modules`` presets besides explicit names (see ``resolve_targets``).
TARGET_PRESETS = ("auto", "all-linear", "attention", "mlp")


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




# --------------------------------------------------------------------------------------------------------------------
# The tuners
# --------------------------------------------------------------------------------------------------------------------


def _parse_lora_alpha(where: str, value: Any) -> Any:
    """An integer, or a multiple of the rank such as ``'2r'`` (resolved by :meth:`PeftMethod.finalize`)."""
    value = check_value(where, "int|str", value)
    if isinstance(value, str) and not re.fullmatch(r"\d*\.?\d*r", value):
        raise ConfigError(f"{where}: expected an integer or a multiple of r such as '2r', got {value!r}")
    if isinstance(value, int) and value <= 0:
        raise ConfigError(f"{where}: expected a positive integer, got {value}")
    return value


def targets_field() -> Field:
    """The ``target_modules`` parameter of the tuners that adapt linear layers (names or a preset)."""
    return Field("target_modules", "list[str]", "auto", "linear layers to adapt: names (peft suffixes) or a preset: "
                 "auto (the architecture's query/value), all-linear (every linear layer but the trained head), "
                 "attention, mlp")


def dropout_field(name: str, default: float, doc: str) -> Field:
    return Field(name, float, default, doc, minimum=0, maximum=1, exclusive_maximum=True,
                 expected="a probability in [0, 1)")


def fused(train: dict[str, Any], device: torch.device) -> bool:
    """Whether a tuner's own AdamW uses the fused kernel, as the loop's own optimizer does (``train.fused_optimizer``
    where the device has it)."""
    from peftbench.engine import fused_adamw_available

    return train.get("fused_optimizer", True) and fused_adamw_available(device)


class PeftMethod(Method):
    """A peft tuner: ``peft_config(backbone, params, total_steps)`` is the one thing a subclass must give."""

    peft = True
    order = 5
    rank_key = "r"  # the parameter a ``lora_alpha = '2r'`` multiplies

    def peft_config(self, backbone, params: dict[str, Any], total_steps: int | None):
        """The peft config of the arm (``modules_to_save`` = :func:`resolve_head`)."""
        raise NotImplementedError

    def targets(self, backbone, params: dict[str, Any]) -> list[str]:
        """The ``target_modules`` passed to peft (presets resolved, see :func:`resolve_targets`)."""
        return resolve_targets(backbone, params["target_modules"], params.get("head", "all"))

    def finalize(self, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        alpha = params.get("lora_alpha")
        if isinstance(alpha, str):
            factor = alpha[:-1]
            value = float(factor) * params[self.rank_key] if factor else float(params[self.rank_key])
            params["lora_alpha"] = int(value) if value == int(value) else value
        return params

    def prepare(self, backbone, params, total_steps=None) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(backbone.model, self.peft_config(backbone, params, total_steps))

    def resolved_names(self, backbone, params):
        return {"head": resolve_head(backbone, params), "target_modules": self.targets(backbone, params)}

    def adapter_parameter_names(self, model: nn.Module) -> set[str]:
        return peft_adapter_names(model)

    def spectrum_targets(self, backbone, params):
        return self.targets(backbone, params)

    def save_weights(self, model: nn.Module, out_dir: Path, base_model: str | None = None) -> int:
        """``adapter/`` (peft format, head included, described for the hub by :func:`describe_adapter` when
        ``base_model`` is given)."""
        if base_model is not None:
            describe_adapter(model, base_model)
        # save_embedding_layers="auto" would look the (hub id of the) base model up online to see whether its vocabulary
        # changed: peftbench never resizes it, and a run must never wait on the network
        model.save_pretrained(out_dir / "adapter", save_embedding_layers=False)
        return sum(f.stat().st_size for f in (out_dir / "adapter").glob("*") if f.is_file())

    def load_weights(self, backbone, run_dir: Path, params: dict[str, Any] | None = None) -> nn.Module:
        from peft import PeftModel

        from peftbench.models import require_safetensors

        require_safetensors(run_dir / "adapter")  # peft would fall back to a pickled adapter_model.bin
        return PeftModel.from_pretrained(backbone.model, run_dir / "adapter")

    def merge_for_inference(self, model: nn.Module) -> nn.Module:
        """Adapter weights merged into the base layers: prediction then costs what the plain model costs.

        The trained head copies (peft's ``modules_to_save`` wrappers) are put in place first: peft 0.21's VeRA and
        (IA)³ unloading assume every wrapped module has a ``weight``, which BERT's pooler has not."""
        if not hasattr(model, "merge_and_unload"):
            return model
        from peft.utils import ModulesToSaveWrapper

        for name, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, module.modules_to_save[module.active_adapters[0]])
        return model.merge_and_unload()


LORA_PARAMS = by_name(
    Field("r", int, 8, "LoRA rank (peft `r`)", minimum=1, expected="a rank >= 1"),
    Field("lora_alpha", "int|str", "2r", "LoRA scaling numerator: an integer or a multiple of r such as '2r' "
          "(default 2r)", parse=_parse_lora_alpha),
    dropout_field("lora_dropout", 0.1, "dropout on the LoRA branch input"),
    targets_field(),
    Field("bias", str, "none", "which biases train: none, all or lora_only (peft `bias`)",
          choices=("none", "all", "lora_only")),
    Field("use_dora", bool, False, "DoRA: weight-decomposed low-rank adaptation (peft `use_dora`)"),
    Field("use_rslora", bool, False, "rank-stabilised scaling alpha/sqrt(r) (peft `use_rslora`)"),
    Field("init_lora_weights", str, "true", "initialisation: true (peft default), gaussian, pissa or olora",
          choices=("true", "gaussian", "pissa", "olora")),
    head_field(),
)


class Lora(PeftMethod):
    name = "lora"
    doc = "LoRA adapters through peft, plus the whole head"
    params = LORA_PARAMS
    label_keys = ("r",)
    order = 4
    role = "adapter"  # the report's disagreement table pairs the reference with the best LoRA arm

    def peft_config(self, backbone, params, total_steps=None):
        from peft import LoraConfig

        init = params.get("init_lora_weights", "true")
        return LoraConfig(
            r=params["r"], lora_alpha=params["lora_alpha"], lora_dropout=params["lora_dropout"],
            target_modules=self.targets(backbone, params), bias=params["bias"],
            use_dora=params.get("use_dora", False), use_rslora=params.get("use_rslora", False),
            init_lora_weights=True if init == "true" else init,
            modules_to_save=resolve_head(backbone, params),
        )

    def packable(self, params):
        """Plain LoRA packs (any rank, alpha, dropout, rsLoRA scaling or learning rate); DoRA (its magnitude vectors
        change the base layer's output) and trained biases (inside the shared base layers) do not."""
        return not params.get("use_dora") and params.get("bias", "none") == "none"

    def pack_layers(self, model):
        from peft.tuners.lora import LoraLayer

        return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]

    def pack_forward(self, layers, x, bounds):
        first = layers[0]
        out = first.base_layer(x)
        deltas = []
        for layer, (lo, hi) in zip(layers, bounds):  # peft's lora.Linear.forward, on the run's own tokens
            adapter = layer.active_adapters[0]
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            seg = layer._cast_input_dtype(x[:, lo:hi], a.weight.dtype)
            deltas.append(b(a(layer.lora_dropout[adapter](seg))) * layer.scaling[adapter])
        return (out + torch.cat(deltas, dim=1)).to(out.dtype)

    def label_flags(self, params):
        flags = [k.removeprefix("use_") for k in ("use_dora", "use_rslora") if params.get(k)]
        init = params.get("init_lora_weights")
        if init not in (None, "true"):
            flags.append(init)
        return flags + super().label_flags(params)


class LoraPlus(Lora):
    name = "loraplus"
    doc = "LoRA with LoRA+ learning rates (B at loraplus_lr_ratio x lr), plus the head"
    params = by_name(*LORA_PARAMS.values(), Field(
        "loraplus_lr_ratio", float, 16.0, "LoRA+: learning rate of the B matrices / that of A (peft "
        "`loraplus_lr_ratio`)", minimum=0, exclusive_minimum=True, expected="a positive ratio (LoRA+ uses >= 1)"))
    order = 5
    role = None

    def make_optimizer(self, model, params, train, device):
        """peft's ``create_loraplus_optimizer`` (AdamW; B matrices, and as in peft every 1-D parameter such as biases,
        at ``loraplus_lr_ratio`` × lr; weight decay as ``train.weight_decay``), fused as the loop's own."""
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=train["lr"],
                                         loraplus_lr_ratio=params["loraplus_lr_ratio"],
                                         loraplus_weight_decay=train["weight_decay"], fused=fused(train, device))


class AdaLora(PeftMethod):
    name = "adalora"
    doc = "AdaLoRA: adaptive per-matrix ranks through peft, plus the whole head"
    params = by_name(
        Field("init_r", int, 12, "AdaLoRA: initial rank of every adapted matrix (peft `init_r`)", minimum=1),
        Field("target_r", int, 8, "AdaLoRA: average rank per matrix left after the budget schedule (peft "
              "`target_r`)", minimum=1),
        Field("lora_alpha", "int|str", "2r", "scaling numerator: an integer or a multiple of init_r such as '2r'",
              parse=_parse_lora_alpha),
        dropout_field("lora_dropout", 0.1, "dropout on the adapter branch input"),
        targets_field(),
        Field("tinit", int, 0, "AdaLoRA: steps of initial warmup before ranks are pruned (peft `tinit`)", minimum=0),
        Field("tfinal", int, 0, "AdaLoRA: final steps with the rank allocation fixed (peft `tfinal`)", minimum=0),
        Field("deltaT", int, 1, "AdaLoRA: steps between two rank reallocations (peft `deltaT`)", minimum=1),
        Field("beta1", float, 0.85, "AdaLoRA: EMA factor of the sensitivity (peft `beta1`)", minimum=0, maximum=1,
              exclusive_maximum=True),
        Field("beta2", float, 0.85, "AdaLoRA: EMA factor of the uncertainty (peft `beta2`)", minimum=0, maximum=1,
              exclusive_maximum=True),
        Field("orth_reg_weight", float, 0.5, "AdaLoRA: weight of the orthogonal regulariser of A and B (peft "
              "`orth_reg_weight`)", minimum=0),
        head_field(),
    )
    label_keys = ("target_r",)
    rank_key = "init_r"  # lora_alpha = '2r': a multiple of its initial rank

    def finalize(self, params):
        params = super().finalize(params)
        if params["target_r"] >= params["init_r"]:
            raise ConfigError(f"{self.name}: target_r ({params['target_r']}) must be below init_r "
                              f"({params['init_r']}): AdaLoRA prunes from init_r down to target_r")
        return params

    def peft_config(self, backbone, params, total_steps=None):
        from peft import AdaLoraConfig

        if not total_steps:
            raise ValueError("adalora: the number of training steps is needed for its rank budget schedule")
        return AdaLoraConfig(
            init_r=params["init_r"], target_r=params["target_r"], lora_alpha=params["lora_alpha"],
            lora_dropout=params["lora_dropout"], target_modules=self.targets(backbone, params),
            tinit=params["tinit"], tfinal=params["tfinal"], deltaT=params["deltaT"], beta1=params["beta1"],
            beta2=params["beta2"], orth_reg_weight=params["orth_reg_weight"], total_step=total_steps,
            modules_to_save=resolve_head(backbone, params),
        )

    def make_optimizer(self, model, params, train, device):
        """AdamW with the orthogonal regulariser's gradient added (:class:`OrthRegAdamW`)."""
        from peftbench.engine import param_groups

        return OrthRegAdamW(param_groups(model, train["weight_decay"]), model=model,
                            orth_reg_weight=params["orth_reg_weight"], lr=train["lr"], fused=fused(train, device))

    def step_hook(self, model, params):
        """The rank reallocation after each optimizer step."""
        return model.base_model.update_and_allocate

    def save_weights(self, model, out_dir, base_model=None):
        """The rank pattern of the last allocation is applied to the model first (peft saves only the kept ranks,
        and the best epoch restored by the loop may predate the last pruning), so what is evaluated is what is
        saved."""
        if model.peft_config["default"].rank_pattern:
            base = model.base_model
            base.rankallocator.mask_using_rank_pattern(base.model, model.peft_config["default"].rank_pattern)
        return super().save_weights(model, out_dir, base_model)


class IA3(PeftMethod):
    name = "ia3"
    doc = "(IA)³: learned rescaling vectors through peft, plus the whole head"
    params = by_name(
        Field("target_modules", "list[str]", "auto", "(IA)³: suffixes of the linear layers to rescale; auto = keys, "
              "values and the feed-forward output layer"),
        Field("feedforward_modules", "list[str]", "auto", "(IA)³: targets whose input (not output) is rescaled; "
              "auto = the architecture's feed-forward layers among target_modules"),
        head_field(),
    )

    def targets(self, backbone, params):
        return resolve_ia3_targets(backbone, params)[0]

    def resolved_names(self, backbone, params):
        targets, feedforward = resolve_ia3_targets(backbone, params)
        return {"head": resolve_head(backbone, params), "target_modules": targets, "feedforward_modules": feedforward}

    def peft_config(self, backbone, params, total_steps=None):
        from peft import IA3Config

        targets, feedforward = resolve_ia3_targets(backbone, params)
        return IA3Config(target_modules=targets, feedforward_modules=feedforward,
                         modules_to_save=resolve_head(backbone, params))


class Vera(PeftMethod):
    name = "vera"
    doc = "VeRA: shared random projections with trained scaling vectors, plus the whole head"
    params = by_name(
        Field("r", int, 256, "VeRA: rank of the shared frozen random projections (peft `r`)", minimum=1,
              expected="a rank >= 1"),
        targets_field(),
        Field("projection_prng_key", int, 0, "VeRA: seed of the shared random projections (peft "
              "`projection_prng_key`)"),
        Field("vera_dropout", float, 0.0, "VeRA: dropout on the adapter branch input (peft `vera_dropout`)",
              minimum=0, maximum=1, exclusive_maximum=True),
        Field("d_initial", float, 0.1, "VeRA: initial value of the d scaling vector (peft `d_initial`)"),
        head_field(),
    )
    label_keys = ("r",)

    def peft_config(self, backbone, params, total_steps=None):
        from peft import VeraConfig

        return VeraConfig(r=params["r"], target_modules=self.targets(backbone, params),
                          projection_prng_key=params["projection_prng_key"], vera_dropout=params["vera_dropout"],
                          d_initial=params["d_initial"], modules_to_save=resolve_head(backbone, params))

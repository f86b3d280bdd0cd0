"""The plugin every method is: :class:`Method`, with the defaults the encoder methods share.

A method owns everything that differs between full fine-tuning, LoRA, a TF-IDF baseline, ...: its parameter schema
(``params``, :class:`peftbench.fields.Field` by name), how a study's values are checked and labelled, how it turns a
backbone into the model to train (``prepare``), its optimizer and step hook, which parameters are adapter and head,
how its weights are saved, loaded and merged for inference, the matrices ``peftbench.spectrum`` analyses, and where
its arms go in the report (``order``, ``role``, ``plot_line``). The code outside ``peftbench.methods`` asks a method
(``methods.METHODS[run.method]``) and never compares method names.

Defaults here are those of a method that fine-tunes a transformers classifier and saves its trainable parameters as
``model.safetensors`` (``full``, ``frozen``, ``untrained``); peft tuners (:mod:`peftbench.methods.peft_methods`) and
baselines (:mod:`peftbench.methods.baseline_arms`) override what they do differently.

Example::

    >>> from peftbench.methods import METHODS
    >>> METHODS["lora"].label(None, {"r": 4, "lora_alpha": 8}, ["r"])
    'lora r=4'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftbench.fields import ConfigError, Field

# Training settings that do not matter for a method that does not train (kept out of its run id).
EVAL_ONLY_TRAIN_KEYS = ("eval_batch_size", "max_length", "max_tokens_per_batch", "bf16", "pooling")

# Settings added after runs were stored: at these values they are left out of the run config (and so out of the run
# id), so every run stored before they existed keeps its id; code reads them with ``.get(key, default)``.
OMITTED_AT_DEFAULT = {"head": "all", "head_lr": None, "gradient_checkpointing": False, "bf16_weights": False,
                      "fast_dropout": False, "pack_runs": 1}


def omit_defaults(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}


def _parse_head(where: str, value: Any) -> Any:
    """A head policy (``all``, ``classifier``) or a list of module names (a comma-separated string is one)."""
    from peftbench.fields import check_value
    from peftbench.models import HEAD_POLICIES

    if isinstance(value, str):
        if value not in HEAD_POLICIES:
            raise ConfigError(f"{where}: expected all, classifier or a list of module names, got {value!r}")
        return value
    return check_value(where, "list[str]", value)


def head_field(doc: str = "which head modules train: all (pooler / pre_classifier + classifier), classifier (peft's "
               "default modules_to_save: classifier / score by suffix, so DistilBERT's pre_classifier too, BERT's "
               "pooler not) or a list of module names") -> Field:
    """The ``head`` parameter every encoder method takes."""
    return Field("head", "list[str]", "all", doc, parse=_parse_head)


class Method:
    """A method: its schema and behaviour. Subclass it, set the class attributes, override what differs, and
    ``methods.register(Subclass())``."""

    name: str = ""
    doc: str = ""
    params: dict[str, Field] = {}
    trains: bool = True                 # False: nothing trains (untrained head, baselines); no optimizer, no epochs
    label_keys: tuple[str, ...] = ()    # parameters always shown in the arm's label (``lora r=8``)
    exports: bool = True                # False: its model is no transformers model, so ``peftbench export`` refuses it
    peft: bool = False                  # built with peft: saved as ``adapter/``, mergeable, exported as an adapter
    baseline: bool = False              # no encoder to fine-tune: runs through :meth:`run_baseline`
    frozen_encoder: bool = False        # the encoder never changes: eval mode, outputs may be cached
    order: float = 5                    # place in the report's tables: baselines first, full fine-tuning last
    role: str | None = None             # what the report uses it for: "floor" (majority), "untrained", "adapter"
    plot_line: tuple[str, str, str] | None = None  # a reference line in the report's plots: (label, colour, style)
    cost_plot: bool = True              # shown in the training-cost plot
    params_axis: bool = True            # a point on the trainable-parameters plot (False: a reference line, for arms
                                        # whose parameter counts are not on the encoders' scale)

    # ---- the study file: checking, defaults, labels ---------------------------------------------------------------

    def check(self, where: str, key: str, value: Any) -> Any:
        """The parameter ``key`` checked (``"<where>.<key>: expected ..."`` on a bad value)."""
        return self.params[key].check(f"{where}.{key}", value)

    def resolve_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every parameter with its default filled in (but those of ``OMITTED_AT_DEFAULT`` left out at it)."""
        return omit_defaults({k: params.get(k, f.default) for k, f in self.params.items()})

    def finalize(self, params: dict[str, Any]) -> dict[str, Any]:
        """Resolve relative values once the grid is expanded (LoRA's ``lora_alpha = '2r'`` → 2·r)."""
        return dict(params)

    def label_flags(self, params: dict[str, Any]) -> list[str]:
        """Words joined to the method's name in an unnamed arm's label (``lora+dora``, ``full+head=classifier``)."""
        head = params.get("head", "all")
        # shown unless the arm is named (two unnamed arms differing only in head stay apart)
        return [] if head == "all" else [f"head={head if isinstance(head, str) else ','.join(head)}"]

    def label(self, name: str | None, params: dict[str, Any], grid_keys: list[str]) -> str:
        """Human label of an arm: its name (or method), then the rank and every other grid-swept parameter."""
        keys = [k for k in self.label_keys if k in params] + [k for k in grid_keys if k not in self.label_keys]
        bits = [f"{k}={params[k]}" for k in keys]
        flags = self.label_flags(params)
        base = name or ("+".join([self.name] + flags) if flags else self.name)
        return " ".join([base] + bits)

    def relevant_train(self, train: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The training settings that enter the run (and its id); ``pack_runs`` only for a run that can pack
        (:meth:`packs`; without ``params``, for a method that can)."""
        if not self.trains:
            return {k: train[k] for k in EVAL_ONLY_TRAIN_KEYS if k in train}
        out = omit_defaults(train)
        can = type(self).packable is not Method.packable if params is None else self.packs(params, train)
        if not can:
            out.pop("pack_runs", None)
        return out

    # ---- the model -------------------------------------------------------------------------------------------------

    def prepare(self, backbone, params: dict[str, Any], total_steps: int | None = None) -> nn.Module:
        """The model to train, with exactly the right parameters requiring grad (``total_steps``: optimizer steps of
        the whole training, for schedules such as AdaLoRA's rank budget)."""
        raise NotImplementedError(f"{self.name}: no model to prepare")

    def resolved_names(self, backbone, params: dict[str, Any]) -> dict[str, list[str]]:
        """What the arm's names and presets resolve to on this model (``head``, peft's ``target_modules``, ...)."""
        return {"head": resolve_head(backbone, params)}

    def adapter_parameter_names(self, model: nn.Module) -> set[str]:
        """Names of the adapter's parameters (none: the method adds no adapter)."""
        return set()

    def count_parameters(self, model: nn.Module, head: list[str]) -> dict[str, Any]:
        """Exact parameter counts of the prepared ``model`` (see :func:`count_parameters`)."""
        return count_parameters(model, head, self.adapter_parameter_names(model))

    def make_optimizer(self, model: nn.Module, params: dict[str, Any], train: dict[str, Any],
                       device: torch.device) -> torch.optim.Optimizer:
        """The run's optimizer before ``train.head_lr`` is applied: the training loop's AdamW."""
        from peftbench.engine import make_optimizer

        return make_optimizer(model, train["lr"], train["weight_decay"], device, train.get("fused_optimizer", True))

    def step_hook(self, model: nn.Module, params: dict[str, Any]) -> Callable[[int], None] | None:
        """Called after each optimizer step (before the gradients are cleared); None: nothing to do."""
        return None

    def spectrum_targets(self, backbone, params: dict[str, Any]) -> list[str] | None:
        """Module names (suffixes) whose learned update ``peftbench.spectrum`` analyses; None: the encoder does not
        change."""
        return None

    def save_weights(self, model: nn.Module, out_dir: Path, base_model: str | None = None) -> int:
        """Save what training changed; return its size in bytes: ``model.safetensors`` with the trainable parameters
        and the head's."""
        from safetensors.torch import save_file

        names = {n for n, p in model.named_parameters() if p.requires_grad or _is_head_param(n)}
        state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in names}
        save_file(state, out_dir / "model.safetensors")
        return (out_dir / "model.safetensors").stat().st_size

    def load_weights(self, backbone, run_dir: Path, params: dict[str, Any] | None = None) -> nn.Module:
        """The trained model of a run folder, on top of a freshly loaded ``backbone``."""
        return load_state(self.model_to_load(backbone, params), run_dir, strict=False)

    def model_to_load(self, backbone, params: dict[str, Any] | None) -> nn.Module:
        """The model ``model.safetensors`` is loaded into: the backbone's."""
        return backbone.model

    def merge_for_inference(self, model: nn.Module) -> nn.Module:
        """The model to predict with once saved (adapters merged into the base weights); itself by default."""
        return model

    def packable(self, params: dict[str, Any]) -> bool:
        """Whether runs of this method can be packed (``train.pack_runs``, :mod:`peftbench.packing`): their frozen
        base weights shared, only adapters (and the head, after the encoder) differing between runs. No by default."""
        return False

    def packs(self, params: dict[str, Any], train: dict[str, Any]) -> bool:
        """Whether a run with these settings can share a forward pass: the method packs them, and no setting cuts or
        recomputes its steps (gradient checkpointing, token-bounded batches)."""
        return (self.packable(params) and not train.get("gradient_checkpointing")
                and not train.get("max_tokens_per_batch"))

    def pack_layers(self, model: nn.Module) -> list[str]:
        """Packing: paths of the layers whose output adds a per-run adapter update to a frozen base layer's."""
        raise NotImplementedError(f"{self.name}: runs are not packed")

    def pack_forward(self, layers: list[nn.Module], x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """Packing: one such layer's output on the concatenated tokens ``x`` (``[1, tokens, features]``) of several
        runs, ``layers[k]`` being run k's copy of it and ``bounds[k]`` its slice of the tokens: the base layer once
        on all tokens, each run's adapter on its own."""
        raise NotImplementedError(f"{self.name}: runs are not packed")

    def run_baseline(self, params: dict[str, Any], splits, seed: int, cache_dir: Path):
        """A baseline's predictions (:class:`peftbench.baselines.BaselineResult`)."""
        raise NotImplementedError(f"{self.name}: not a baseline")


# --------------------------------------------------------------------------------------------------------------------
# Shared by every encoder method: the head, parameter counts, weights on disk
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


def _is_head_param(name: str) -> bool:
    from peftbench.models import HEAD_MODULES

    parts = name.split(".")
    return "modules_to_save" in parts or any(p in HEAD_MODULES for p in parts[:-1])


def count_parameters(model: nn.Module, head: list[str], adapter_names: set[str] | None = None) -> dict[str, Any]:
    """Exact counts of a prepared model whose trained head modules are ``head`` (``resolve_head``) and whose adapter
    parameters are ``adapter_names`` (default: those of peft's tuner layers, :func:`peft_adapter_names`):

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
    adapter_names = peft_adapter_names(model) if adapter_names is None else adapter_names
    in_head = head_parameter_names(model, head)
    trainable = {n: p.numel() for n, p in named.items() if p.requires_grad}
    total = sum(p.numel() for n, p in named.items() if "original_module" not in n.split("."))
    head_all = sum(named[n].numel() for n in in_head)
    head_trainable = sum(v for n, v in trainable.items() if n in in_head)
    adapter = sum(named[n].numel() for n in adapter_names)
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


def peft_adapter_names(model: nn.Module) -> set[str]:
    """Names of the parameters peft's tuner layers hold as adapter weights (their ``adapter_layer_names``: LoRA's
    A/B and DoRA magnitudes, AdaLoRA's E, (IA)³ vectors, VeRA scalings); empty for a model without peft layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = set()
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                part = getattr(module, attr, None)
                if isinstance(part, nn.Module):
                    out |= {f"{prefix}.{attr}.{n}" if prefix else f"{attr}.{n}" for n, _ in part.named_parameters()}
    return out


def load_state(model: nn.Module, run_dir: Path, strict: bool) -> nn.Module:
    """``run_dir/model.safetensors`` loaded into ``model`` (``strict``: it holds every weight); ValueError when its
    weights do not fit the model."""
    from safetensors.torch import load_file

    state = load_file(run_dir / "model.safetensors")
    missing = set(state) - set(model.state_dict())
    if missing:
        raise ValueError(f"{run_dir}/model.safetensors: weights {sorted(missing)[:3]} do not fit the model")
    model.load_state_dict(state, strict=strict)
    return model

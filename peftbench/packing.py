"""Several runs of one study trained in one forward/backward pass (``train.pack_runs = N``).

Runs that share the base model, dataset and training shape, and whose method only adds adapters to frozen base
layers (LoRA: seeds, ranks, alphas, dropouts, learning rates and schedules may differ), are *packed*: at every step
each run's own batch (its own data order, padded to its own longest text) is embedded, the runs' token states are
concatenated into one ``[1, tokens, hidden]`` stream, and the encoder runs once over it, so every frozen base GEMM,
LayerNorm, activation and hidden-state dropout runs once for all the runs. What differs per run is applied to the
run's own slice of the stream: its adapters (``Method.pack_forward``), its attention (each run's texts attend only
within themselves, under the run's own padding mask, through the model's own attention function), and, after the
encoder, its own head, pooling and classifier (the run's own model, called with its encoder replaced by the packed
output). Each run keeps its own optimizer, schedule, clipping, early stopping and best-epoch weights
(:func:`peftbench.engine.train_packed`), and is evaluated and stored by itself, as a solo run is.

So a packed run is a valid independent run: without dropout its losses are those of the same run trained alone up to
floating-point rounding (``tests/test_packing.py``); with dropout its masks are independent draws (one seeded stream
per pack, not the solo run's stream), so its metrics are equal in distribution. Packing is deterministic for the same
pending runs (a pack is made of the study's runs in plan order; a run resumed or retried with other partners draws
other dropout masks) and recorded in each run's ``result.json`` (``speed.packing``). A packed run's train time is its
equal share of the pack's wall time (so its examples/s are the pack's total), its peak memory the pack's.
Whether it pays depends on the hardware: docs/benchmarks.md measures it.

Architectures: encoders whose base model has ``embeddings`` and a layer stack (``encoder`` or ``transformer``) taking
``(hidden_states, attention_mask)`` and attending through transformers' attention functions (BERT, RoBERTa,
DistilBERT, MiniLM, ...), checked once per pack by a packed forward against the runs' own; any other model, or runs
whose frozen weights differ, train one at a time (:class:`PackError` says why, recorded in ``speed.packing``).

Example::

    >>> from peftbench.packing import plan                      # doctest: +SKIP
    >>> [len(group) for group in plan(runs)]                   # doctest: +SKIP
    [3, 3, 1]
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import torch
from torch import nn

from peftbench import methods

# Training settings every run of a pack must share (the rest, e.g. lr, schedule, warmup, weight decay, clipping,
# patience and the seed, are each run's own).
SHARED_TRAIN_KEYS = ("epochs", "batch_size", "max_length", "bf16", "bf16_weights", "fast_dropout", "length_buckets",
                     "pooling", "pack_runs")
NAME = "peftbench_packed"  # the attention implementation registered with transformers while a pack runs


class PackError(ValueError):
    """These models cannot share a forward pass (the runs then train one at a time)."""


def pack_key(run) -> str | None:
    """Runs with equal keys may be packed together; None: the run trains alone (``pack_runs`` 1, a method that
    does not pack, or a setting that changes steps: gradient checkpointing, token-bounded batches)."""
    train = run.train
    if train.get("pack_runs", 1) <= 1 or not methods.packs(run.method, run.method_params, train):
        return None
    shared = {key: train.get(key) for key in SHARED_TRAIN_KEYS}
    layout = {key: run.method_params.get(key) for key in ("target_modules", "head")}
    return json.dumps([run.model, run.dataset, run.method, shared, layout], sort_keys=True, default=str)


def plan(runs: list) -> list[list]:
    """``runs`` in groups to train together, deterministically: in plan order, each run joins the open group of its
    key until that holds ``pack_runs`` runs; a group sits where its first run was."""
    groups: list[list] = []
    open_groups: dict[str, list] = {}
    for run in runs:
        key = pack_key(run)
        group = open_groups.get(key) if key is not None else None
        if group is not None and len(group) < run.train["pack_runs"]:
            group.append(run)
            continue
        groups.append([run])
        if key is not None:
            open_groups[key] = groups[-1]
    return groups


def encoder_of(model: nn.Module) -> nn.Module:
    """The transformers base model (``BertModel``, ...) inside a peft-wrapped classifier."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def _stack(base: nn.Module) -> nn.Module:
    for name in ("encoder", "transformer"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise PackError(f"{type(base).__name__} has no encoder/transformer layer stack")


class Pack:
    """Several runs' models that share one frozen encoder; :meth:`forward` gives each run's logits for its batch."""

    def __init__(self, models: list[nn.Module], method: str):
        self.models, self.method = models, methods.METHODS[method]
        self.bases = [encoder_of(m) for m in models]
        for base in self.bases:
            if not isinstance(getattr(base, "embeddings", None), nn.Module):
                raise PackError(f"{type(base).__name__} has no embeddings module")
            if not getattr(type(base), "_supports_attention_backend", False):  # e.g. MPNet's, DeBERTa's own attention
                raise PackError(f"{type(base).__name__} does not attend through transformers' attention functions")
            if getattr(base, "embeddings_project", None) is not None:  # ELECTRA-small: a layer between the two
                raise PackError(f"{type(base).__name__} projects its embeddings before the encoder")
            _stack(base)
        first = dict(self._encoder_parameters(0))
        for k in range(1, len(models)):
            for name, p in self._encoder_parameters(k):
                if p.requires_grad != first[name].requires_grad or (not p.requires_grad
                                                                    and not torch.equal(p, first[name])):
                    raise PackError(f"the runs' frozen weights differ ({name})")
        trained = [n for n, p in first.items() if p.requires_grad and ".lora_" not in n]
        if trained:
            raise PackError(f"a shared encoder weight trains ({trained[0]})")
        self.layers = {path: [m.get_submodule(path) for m in models] for path in self.method.pack_layers(models[0])}
        self._check()

    def _check(self) -> None:
        """One packed forward of two short texts per run against the runs' own forwards (eval mode, no grad): a
        model whose encoder does something this module does not know raises PackError here instead of training
        on wrong logits."""
        modes = [(m, m.training) for model in self.models for m in model.modules()]
        device = next(self.models[0].parameters()).device
        ids = torch.arange(5, 11, device=device).view(2, 3)
        inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]], device=device)}
        bf16 = any(p.dtype == torch.bfloat16 for p in self.models[0].parameters())  # train.bf16_weights
        try:
            for model in self.models:
                model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                packed = self.forward(list(range(len(self.models))), [inputs] * len(self.models))
                alone = [model(**inputs).logits for model in self.models]
            tol = 5e-2 if bf16 else 1e-4
            if not all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(packed, alone)):
                raise PackError("a packed forward does not give the runs' own logits on this model")
        except PackError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the architecture does differently
            raise PackError(f"a packed forward fails on this model ({type(e).__name__}: {e})") from None
        finally:
            for m, training in modes:
                m.training = training

    def _encoder_parameters(self, k: int):
        base = self.bases[k]
        for part, module in (("embeddings", base.embeddings), ("stack", _stack(base))):
            yield from ((f"{part}.{n}", p) for n, p in module.named_parameters())

    def forward(self, runs: list[int], inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Logits of run ``runs[j]`` (an index into the pack) for its model inputs ``inputs[j]``."""
        from transformers.masking_utils import create_bidirectional_mask

        base = self.bases[runs[0]]
        states, segments, lo = [], [], 0
        for inp in inputs:
            kwargs = {k: inp[k] for k in ("input_ids", "token_type_ids") if k in inp}
            emb = base.embeddings(**kwargs)
            b, length, hidden = emb.shape
            mask = create_bidirectional_mask(config=base.config, inputs_embeds=emb,
                                             attention_mask=inp["attention_mask"])
            states.append(emb.reshape(b * length, hidden))
            segments.append((lo, lo + b * length, b, length, mask))
            lo += b * length
        stream = torch.cat(states).unsqueeze(0)
        with self._packed(runs, base, segments):
            out = _stack(base)(stream, attention_mask=None).last_hidden_state[0]
        logits = []
        for k, inp, (lo, hi, b, length, _) in zip(runs, inputs, segments):
            with _replay(self.bases[k], out[lo:hi].view(b, length, -1)):
                logits.append(self.models[k](**inp).logits)
        return logits

    @contextlib.contextmanager
    def _packed(self, runs: list[int], base: nn.Module, segments: list[tuple]):
        """While the shared stack (``base``'s, run ``runs[0]``'s) runs: its adapter layers apply every listed run's
        adapter to that run's own tokens, and attention runs per run (:func:`attention`)."""
        bounds = [(lo, hi) for lo, hi, *_ in segments]
        owner = self.models[runs[0]]
        inner = base.config._attn_implementation
        with contextlib.ExitStack() as stack:
            for path, layers in self.layers.items():
                chosen = [layers[k] for k in runs]
                stack.enter_context(_instance_attr(owner.get_submodule(path), "forward",
                                                   lambda x, chosen=chosen: self.method.pack_forward(chosen, x,
                                                                                                     bounds)))
            _register()
            _STATE.update(segments=segments, inner=inner)
            stack.enter_context(_instance_attr(base.config, "_attn_implementation_internal", NAME))
            yield


_STATE: dict[str, Any] = {}


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs):
    """Attention over a packed stream (``[1, heads, tokens, head_dim]``): each run's slice is unflattened to its
    ``[batch, heads, length, head_dim]`` and goes through the model's own attention function under its own mask;
    the outputs are concatenated back in stream order (``[1, tokens, heads, head_dim]``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = _STATE["inner"]
    function = (ALL_ATTENTION_FUNCTIONS[inner] if inner != "eager"
                else sys.modules[type(module).__module__].eager_attention_forward)
    outputs = []
    for lo, hi, b, length, mask in _STATE["segments"]:
        q, k, v = (t[0, :, lo:hi].unflatten(1, (b, length)).transpose(0, 1) for t in (query, key, value))
        out, _ = function(module, q, k, v, mask, **kwargs)
        outputs.append(out.reshape(b * length, *out.shape[2:]))
    return torch.cat(outputs).unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)


@contextlib.contextmanager
def _instance_attr(obj: Any, name: str, value: Any):
    """``obj.name = value`` on the instance for the block (a module's ``forward``, a config's attention choice)."""
    had, old = name in obj.__dict__, obj.__dict__.get(name)
    obj.__dict__[name] = value
    try:
        yield
    finally:
        if had:
            obj.__dict__[name] = old
        else:
            del obj.__dict__[name]


@contextlib.contextmanager
def _replay(base: nn.Module, states: torch.Tensor):
    """The run's own model forward with its encoder's output already computed: its embeddings give ``states`` and
    its layer stack passes them through, so the model's pooling and head (and mask handling) run as they do solo."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    def passthrough(hidden_states, *args, **kwargs):
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states)

    with _instance_attr(base.embeddings, "forward", lambda *args, **kwargs: states), \
            _instance_attr(_stack(base), "forward", passthrough):
        yield

"""Methods without an adapter: ``full`` (every parameter trains), ``frozen`` (only the head trains), ``untrained`` (the
freshly initialised head, evaluated) and ``lstm`` (a (Bi)LSTM trained from scratch, :mod:`peftbench.lstm`).

Example::

    >>> from peftbench.methods import METHODS
    >>> METHODS["frozen"].frozen_encoder, METHODS["untrained"].trains
    (True, False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from peftbench.fields import Field, by_name
from peftbench.methods.base import Method, head_field, head_parameter_names, load_state, resolve_head


class Full(Method):
    """Full fine-tuning: every parameter trains. Its spectrum is read on the architecture's default LoRA targets
    (query/value), so full fine-tuning and LoRA are compared on the same matrices."""

    name = "full"
    doc = "full fine-tuning: every parameter trains"
    params = by_name(head_field("every parameter trains; which modules count as the head (and take train.head_lr): "
                                "all, classifier or a list of module names"))
    order = 9
    plot_line = ("full fine-tuning", "tab:red", "--")

    def prepare(self, backbone, params, total_steps=None) -> nn.Module:
        for p in backbone.model.parameters():
            p.requires_grad_(True)
        return backbone.model

    def spectrum_targets(self, backbone, params):
        from peftbench.methods.peft_methods import DEFAULT_TARGETS

        return DEFAULT_TARGETS.get(backbone.model_type)


class Frozen(Method):
    """The pretrained encoder is frozen (and kept in eval mode: no dropout), only the classification head trains. Its
    encoder output can be computed once and reused every epoch (``train.cache_frozen_features``)."""

    name = "frozen"
    doc = "frozen encoder, only the classification head trains"
    params = by_name(head_field())
    frozen_encoder = True
    order = 3
    plot_line = ("frozen encoder", "tab:gray", ":")

    def prepare(self, backbone, params, total_steps=None) -> nn.Module:
        model = backbone.model
        head = head_parameter_names(model, resolve_head(backbone, params))
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
        return model


class Untrained(Method):
    """Nothing trains; the randomly initialised head is evaluated (the pre-fine-tuning baseline)."""

    name = "untrained"
    doc = "no training: the freshly initialised head (pre-fine-tuning baseline)"
    params: dict[str, Field] = {}
    trains = False
    frozen_encoder = True
    order = 0.5
    role = "untrained"
    cost_plot = False
    params_axis = False

    def prepare(self, backbone, params, total_steps=None) -> nn.Module:
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        return backbone.model


class Lstm(Method):
    """No pretrained weights at all: a (Bi)LSTM classifier (``peftbench.lstm``) with embeddings learned from scratch
    over the study model's tokenizer vocabulary, trained by the same loop on the same token ids, splits, batches and
    seeds (the "LSTM from scratch" row of the IMDB comparison)."""

    name = "lstm"
    params_axis = False  # its own from-scratch weights, not a fine-tuned encoder's
    doc = "a (Bi)LSTM trained from scratch over the model's tokenizer vocabulary (no pretrained weights)"
    params = by_name(
        Field("embedding_dim", int, 128, "LSTM: size of the token embeddings, learned from scratch over the model's "
              "tokenizer vocabulary", minimum=1),
        Field("hidden_size", int, 128, "LSTM: hidden state size per direction", minimum=1),
        Field("num_layers", int, 1, "LSTM: stacked recurrent layers", minimum=1),
        Field("dropout", float, 0.2, "LSTM: dropout on the embeddings, between stacked layers and before the "
              "classifier", minimum=0, maximum=1, exclusive_maximum=True, expected="a probability in [0, 1)"),
        Field("bidirectional", bool, True, "LSTM: read the text both ways (the classifier sees both directions)"),
        Field("pool", str, "mean", "LSTM: text vector from the top layer: mean (its outputs averaged over the real "
              "tokens) or last (its final states, both directions)", choices=("last", "mean"),
              expected="last or mean"),
    )
    exports = False
    order = 1.5

    def prepare(self, backbone, params, total_steps=None) -> nn.Module:
        """A from-scratch (Bi)LSTM over the backbone's vocabulary (``config.vocab_size``: every id its tokenizer
        gives); the backbone's weights are not used. Every parameter trains."""
        from peftbench import lstm

        return lstm.build(backbone.model.config.vocab_size, backbone.num_labels, params)

    def resolved_names(self, backbone, params):
        from peftbench.lstm import HEAD  # its own model, whose head is its linear classifier

        return {"head": list(HEAD)}

    def load_weights(self, backbone, run_dir: Path, params: dict[str, Any] | None = None) -> nn.Module:
        """Its own model, rebuilt from the run's parameters (defaults for any left out); the run saved every weight."""
        return load_state(self.prepare(backbone, self.resolve_defaults(params or {})), run_dir, strict=True)

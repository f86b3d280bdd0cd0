"""A (Bi)LSTM text classifier trained from scratch: the "no pretraining" baseline (``method = "lstm"``).

It reads the token ids of the study model's tokenizer (so the same truncation, splits, batches and seeds as every
other arm) but none of the model's weights: its embeddings are learned from scratch over that tokenizer's
vocabulary. The architecture is the classic one::

    embedding (vocab × embedding_dim) → dropout → LSTM (num_layers, bidirectional) over the real tokens only
    (``pack_padded_sequence``: padding never enters the recurrence) → the text vector (``pool``: the mean of the
    top layer's outputs over the real tokens, or its last hidden state in each direction, concatenated) → dropout →
    linear ``classifier``

Its forward takes ``input_ids`` and ``attention_mask`` and returns an object with ``.logits``, like a transformers
classifier, so the training loop, prediction and weights on disk need nothing of their own. The recurrence runs in
float32 even under bf16 autocast (cuDNN's LSTM kernels and the CPU's take no bf16 reliably; an LSTM this size is
cheap anyway).

Example::

    >>> import torch
    >>> from peftbench.lstm import LSTMClassifier
    >>> model = LSTMClassifier(vocab_size=100, num_labels=2, embedding_dim=8, hidden_size=4)
    >>> model(input_ids=torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]])).logits.shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers.modeling_outputs import SequenceClassifierOutput

# The module that is the classification head (what ``head`` / ``train.head_lr`` refer to).
HEAD = ("classifier",)
# How the token states become the text vector: the top layer's final states, or their mean over the real tokens.
POOLINGS = ("last", "mean")


class LSTMClassifier(nn.Module):
    """Embedding → (Bi)LSTM over the unpadded tokens → mean or final states → dropout → ``classifier``."""

    def __init__(self, vocab_size: int, num_labels: int, embedding_dim: int = 128, hidden_size: int = 128,
                 num_layers: int = 1, dropout: float = 0.2, bidirectional: bool = True, pool: str = "mean"):
        super().__init__()
        if pool not in POOLINGS:
            raise ValueError(f"pool: expected one of {', '.join(POOLINGS)}, got {pool!r}")
        self.pool = pool
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        # nn.LSTM's own dropout acts between stacked layers only (it warns when there is one layer)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size * (2 if bidirectional else 1), num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text vector. ``pool = "last"``: the top layer's last hidden state in each direction (forward: after
        the last real token; backward: after the first), concatenated; ``"mean"``: the top layer's outputs (both
        directions) averaged over the real tokens."""
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        with torch.autocast(input_ids.device.type, enabled=False):
            embedded = self.dropout(self.embedding(input_ids)).float()
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            out, (h_n, _) = self.lstm(packed)  # h_n: (num_layers · directions, batch, hidden), batch order kept
        if self.pool == "mean":
            states, _ = pad_packed_sequence(out, batch_first=True)  # zeros after each text's end
            return states.sum(1) / lengths.to(states.device, states.dtype)[:, None]
        directions = 2 if self.lstm.bidirectional else 1
        return torch.cat(list(h_n[-directions:]), dim=-1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return SequenceClassifierOutput(logits=self.head(self.features(input_ids, attention_mask)))


def build(vocab_size: int, num_labels: int, params: dict) -> LSTMClassifier:
    """The classifier of an ``lstm`` arm's parameters (``methods.METHODS["lstm"].params``); every parameter trains."""
    return LSTMClassifier(vocab_size, num_labels, embedding_dim=params["embedding_dim"],
                          hidden_size=params["hidden_size"], num_layers=params["num_layers"],
                          dropout=params["dropout"], bidirectional=params["bidirectional"],
                          pool=params["pool"])

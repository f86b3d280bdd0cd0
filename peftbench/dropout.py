"""Cheaper dropout on CPU, with the same Bernoulli(1 − p) masks and seeded determinism (``train.fast_dropout``).

torch's CPU dropout draws every mask element from its Mersenne Twister one by one (``aten::bernoulli_``: ≈14% of a
MiniLM LoRA training step on 2 cores, docs/benchmarks.md). Here the mask's random bits come in bulk from numpy's SFC64
generator, seeded from torch's own generator at each call, so a run seeded with ``torch.manual_seed`` draws the same
masks every time. An element is kept when its 32-bit uniform falls below ``(1 − p)·2³²``: Bernoulli(1 − p) up to 2⁻³²
(torch's float path resolves 2⁻²⁴), independent across elements and calls. The uniform is compared a byte at a time,
so an element costs ~8 random bits (:func:`keep_mask`); kept elements are scaled by 1/(1 − p), as ``nn.Dropout``
does.

:func:`use_fast_dropout` swaps every ``nn.Dropout`` of a model (hidden-state dropout, LoRA's ``lora_dropout``) for
:class:`FastDropout` and routes attention through :func:`attention`, which draws the attention-probability dropout
mask the same way (transformers' SDPA path draws it inside the kernel). On CUDA torch's Philox dropout is already fast
and nothing is swapped.

Example::

    >>> import torch
    >>> from peftbench.dropout import FastDropout
    >>> _ = torch.manual_seed(0)
    >>> FastDropout(0.5).train()(torch.ones(8)).tolist()  # doctest: +SKIP
    [2.0, 0.0, 2.0, 2.0, 0.0, 0.0, 2.0, 0.0]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NAME = "peftbench_sdpa"  # the attention implementation registered with transformers


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean mask of ``shape``, each element True with probability 1 − p, from the bits of one SFC64 stream
    seeded by torch's default generator (so ``torch.manual_seed`` fixes it).

    An element is kept when its 32-bit uniform U falls below T = round((1 − p)·2³²). U is compared a byte at a time:
    its top byte B decides unless B equals T's top byte (probability 1/256), and only those ties draw U's other 24
    bits. So the law is exactly P(U < T) = T/2³², from ~8 random bits per element instead of 32."""
    n = int(np.prod(shape))
    threshold = round((1.0 - p) * 2**32)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    with torch.profiler.record_function("peftbench::keep_mask"):  # numpy's time, visible in profiles
        if threshold >= 2**32:
            return torch.ones(shape, dtype=torch.bool)
        bits = np.random.SFC64(seed)
        top, rest = np.uint8(threshold >> 24), np.uint32(threshold & 0xFFFFFF)
        first = bits.random_raw((n + 7) // 8).view(np.uint8)[:n]
        keep = first < top
        ties = np.flatnonzero(first == top)
        if ties.size:
            keep[ties] = (bits.random_raw((ties.size + 1) // 2).view(np.uint32)[:ties.size] >> 8) < rest
        return torch.from_numpy(keep).view(shape)


def drop(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` with a :func:`keep_mask` (autograd passes the gradient through the same mask)."""
    if p <= 0:
        return x
    if p >= 1:  # nn.Dropout(1.0): every element dropped
        return x * 0.0
    # bool → float through uint8: torch's CPU cast from bool is ~6× slower than from uint8
    scale = keep_mask(x.shape, p).view(torch.uint8).to(device=x.device, dtype=x.dtype).mul_(1.0 / (1.0 - p))
    return x * scale


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`keep_mask` masks; identity in eval mode, like its parent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop(x, self.p) if self.training and self.p > 0 else x


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, except in training with dropout: then softmax(QKᵀ·scale + mask) gets a
    :func:`keep_mask` dropout before the product with V (what SDPA's math path computes, with cheaper masks)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (module.training and dropout > 0) or query.shape[1] != key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = drop(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_fast_dropout(model: nn.Module, device: torch.device) -> int:
    """Swap ``model``'s dropout for the bulk-bit one (CPU only; a no-op elsewhere). Returns how many dropout
    modules were swapped (attention counted once per model config switched from SDPA)."""
    if device.type != "cpu":
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = FastDropout
            swapped += 1
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and getattr(config, "attention_probs_dropout_prob",
                                                                                getattr(config, "attention_dropout", 0)):
            _register()
            config._attn_implementation = NAME
            swapped += 1
    return swapped

"""Model FLOPs of a run, the numerator of MFU (model FLOPs utilisation).

Counted by torch's own FLOP counter (:class:`torch.utils.flop_counter.FlopCounterMode`: every matmul and attention
kernel, forward and backward as autograd really runs them), on the run's own model, for one example at three sequence
lengths. A transformer's FLOPs on an example of ``L`` real tokens are exactly ``c + a·L + b·L²``: the linear layers
act per token (``a``), attention's two ``L×L`` products are quadratic (``b``), the head acts once per example (``c``);
three lengths fix the three coefficients, and a sum over the run's examples needs only ``n``, ``ΣL`` and ``ΣL²``.

What is counted:

- **training**, per epoch: forward + the backward autograd runs for this method (activation gradients as far back
  as the first trained parameter, weight gradients only of the trained parameters: LoRA's frozen base matrices get
  none, full fine-tuning's all), over every training example's real (unpadded) tokens; padding, the optimizer and
  elementwise work are not model FLOPs. A frozen encoder whose outputs are cached is counted as its one forward
  pass over every split (the head's per-epoch work is under 0.1% and left out). With gradient checkpointing the
  recomputed forward is counted too (it does run).
- **prediction**: one forward pass over the validation and test examples, of the model that predicts (LoRA merged
  when ``merge_for_eval``).

torch's counter has no formula for the CPU flash-attention kernel, so it gets the same one as the CUDA kernels
(:func:`torch.utils.flop_counter.sdpa_flop_count`): 4·L²·d per layer forward, 2.5× that backward.

Example::

    >>> from peftbench.flops import polynomial, total
    >>> poly = polynomial(lambda L: 10 + 3 * L + 2 * L * L)
    >>> total(poly, [1, 2])       # (10+3+2) + (10+6+8)
    39
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils import flop_counter

LENGTHS = (2, 3, 4)  # any three distinct lengths fix the polynomial; short ones are cheap

_aten = torch.ops.aten


def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
                 _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def count(fn: Callable[[], Any]) -> int:
    """Matmul/attention FLOPs of running ``fn()`` (forward, and backward if ``fn`` calls it)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


def polynomial(flops_at: Callable[[int], int], lengths: tuple[int, int, int] = LENGTHS) -> tuple[int, int, int]:
    """``(c, a, b)`` with ``flops_at(L) = c + a·L + b·L²``, through three lengths (integers: FLOPs are)."""
    ys = [flops_at(n) for n in lengths]
    c, a, b = np.linalg.solve(np.vander(np.array(lengths, dtype=float), 3, increasing=True), np.array(ys, float))
    return int(round(c)), int(round(a)), int(round(b))


def total(poly: tuple[int, int, int], lengths: Iterable[int]) -> int:
    """The polynomial's FLOPs summed over examples of these lengths."""
    c, a, b = poly
    lengths = np.asarray(list(lengths), dtype=np.int64)
    return int(c * len(lengths) + a * lengths.sum() + b * (lengths ** 2).sum())


def model_polynomial(model: torch.nn.Module, inputs_at: Callable[[int], dict[str, torch.Tensor]],
                     backward: bool, autocast: Callable[[], Any]) -> tuple[int, int, int]:
    """The FLOP polynomial of ``model`` on one example (``inputs_at(L)``: its model inputs at length ``L``), forward
    only or forward + backward. The model is left as it was: the RNG state is restored (dropout draws nothing from
    the run's stream) and the gradients it made are dropped."""
    params = [p for p in model.parameters() if p.requires_grad]
    kept = [p.grad for p in params]

    def flops_at(length: int) -> int:
        def step():
            with autocast():
                logits = model(**inputs_at(length)).logits
            if backward:
                logits.float().sum().backward()

        if backward:
            return count(step)
        with torch.no_grad():
            return count(step)

    with torch.random.fork_rng(devices=[]):
        poly = polynomial(flops_at)
    for p, g in zip(params, kept):
        p.grad = g
    return poly


def utilisation(flops: int | None, seconds: float | None) -> float | None:
    """Achieved FLOP/s (None without FLOPs or time)."""
    return flops / seconds if flops and seconds else None

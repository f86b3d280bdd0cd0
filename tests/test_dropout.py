"""train.fast_dropout: Bernoulli(1 − p) masks, seeded, gradients through the same mask, attention unchanged but for
its dropout mask, and identical predictions in eval mode."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from peftbench import dropout, methods
from peftbench.cli import main
from peftbench.data import collate
from peftbench.models import build_classifier
from tests.conftest import write_study


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_one_minus_p(p):
    torch.manual_seed(0)
    mask = dropout.keep_mask((1000, 1000), p).numpy()
    test = stats.binomtest(int(mask.sum()), mask.size, 1 - p)
    assert test.pvalue > 1e-3
    # neighbouring elements (neighbouring bytes of one 64-bit word) are independent: a 2×2 table's chi-square
    pairs = mask.reshape(-1, 2)
    table = [[np.sum(~pairs[:, 0] & ~pairs[:, 1]), np.sum(~pairs[:, 0] & pairs[:, 1])],
             [np.sum(pairs[:, 0] & ~pairs[:, 1]), np.sum(pairs[:, 0] & pairs[:, 1])]]
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_ties_of_the_first_byte_are_resolved_by_the_other_24_bits():
    # 1 − p = (230·2²⁴ + 2²³)/2³²: an element is kept outright when its first random byte is below 230, and, when
    # it is 230 (1/256 of them), with probability 1/2 from its other 24 bits. Getting the ties wrong (all kept or all
    # dropped) moves the keep rate by 1/512 ≈ 0.002, i.e. 13 standard errors at 4M elements.
    keep = (230 * 2**24 + 2**23) / 2**32
    torch.manual_seed(2)
    mask = dropout.keep_mask((4_000_000,), 1 - keep).numpy()
    assert stats.binomtest(int(mask.sum()), mask.size, keep).pvalue > 1e-3
    for wrong in (230 / 256, 231 / 256):
        assert stats.binomtest(int(mask.sum()), mask.size, wrong).pvalue < 1e-6
    assert dropout.keep_mask((10,), 1e-12).all()  # (1 − p)·2³² rounds to 2³²: every element kept


def test_seeded_and_fresh_per_call():
    torch.manual_seed(5)
    a, b = dropout.keep_mask((64,), 0.3), dropout.keep_mask((64,), 0.3)
    torch.manual_seed(5)
    assert torch.equal(dropout.keep_mask((64,), 0.3), a) and not torch.equal(a, b)


def test_module_scales_and_passes_gradients_through_the_mask():
    layer = dropout.FastDropout(0.25).train()
    x = torch.ones(4000, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    kept = y.detach() != 0
    assert torch.allclose(y.detach()[kept], torch.full_like(y.detach()[kept], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x·m/(1−p))/dx = m/(1−p)
    assert torch.equal(layer.eval()(x), x) and torch.equal(dropout.FastDropout(0.0).train()(x), x)
    assert torch.equal(dropout.FastDropout(1.0).train()(x), torch.zeros_like(x))  # as nn.Dropout(1.0)


def test_attention_equals_sdpa_but_for_the_mask(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    module = torch.nn.Module().train()
    module.is_causal = False
    monkeypatch.setattr(dropout, "drop", lambda x, p: x)
    for mask in (None, torch.rand(2, 1, 5, 5) > 0.3, torch.randn(2, 1, 5, 5)):
        if mask is not None and mask.dtype == torch.bool:
            mask[..., 0] = True  # every query attends somewhere
        ours, _ = dropout.attention(module, q, k, v, mask, dropout=0.1)
        plain, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0)
        assert torch.allclose(ours, plain, atol=1e-5)


def test_eval_predictions_unchanged(tiny_bert):
    torch.manual_seed(0)
    net = methods.prepare("lora", build_classifier(str(tiny_bert), 2),
                          {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "auto", "bias": "none"})
    inputs = collate([[2, 7, 8, 9, 3], [2, 7, 3]], np.arange(2), 0)
    net.eval()
    before = net(**inputs).logits
    assert dropout.use_fast_dropout(net, torch.device("cpu")) > 0
    assert any(isinstance(m, dropout.FastDropout) for m in net.modules())
    assert net.base_model.model.config._attn_implementation == dropout.NAME
    assert torch.equal(net.eval()(**inputs).logits, before)
    assert dropout.use_fast_dropout(net, torch.device("meta")) == 0  # not on other devices


def test_a_run_with_fast_dropout_is_recorded_and_deterministic(tmp_path, tiny_bert, tiny_data):
    arms = '[[arms]]\nmethod = "lora"\nr = 4\nlora_dropout = 0.1\nfast_dropout = true\n'
    results = []
    for name in ("a", "b"):
        study = write_study(tmp_path / f"{name}.toml", tiny_bert, tiny_data, arms)
        assert main(["run", str(study), "--store", str(tmp_path / name), "--no-report"]) == 0
        (path,) = (tmp_path / name).glob("*/result.json")
        results.append(json.loads(path.read_text()))
    assert results[0]["speed"]["fast_dropout"] is True
    assert results[0]["metrics"]["test"] == results[1]["metrics"]["test"]

"""Model FLOPs (peftbench.flops): the per-example polynomial equals torch's counter on real batches, and its
coefficients are the textbook ones (2·params per token forward, attention 4·L²·d per layer, backward 2× forward)."""

import contextlib
import json

import numpy as np
import pytest
import torch

from peftbench import flops, methods
from peftbench.cli import main
from peftbench.data import collate
from peftbench.models import build_classifier
from tests.conftest import write_study

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "auto", "bias": "none"}


def test_polynomial_and_total_are_exact():
    poly = flops.polynomial(lambda n: 7 + 5 * n + 3 * n * n)
    assert poly == (7, 5, 3)
    assert flops.total(poly, [1, 4, 10]) == sum(7 + 5 * n + 3 * n * n for n in (1, 4, 10))


def model(tiny_bert, method="full"):
    torch.manual_seed(0)
    return methods.prepare(method, build_classifier(str(tiny_bert), 2), LORA if method == "lora" else {})


def inputs(length, rows=1):
    ids = [[2] + [7] * (length - 2) + [3]] * rows
    return collate(ids, np.arange(rows), 0)


def poly_of(net, backward):
    (net.train if backward else net.eval)()
    return flops.model_polynomial(net, inputs, backward, contextlib.nullcontext)


def test_forward_coefficients_are_the_textbook_ones(tiny_bert):
    net = model(tiny_bert)
    c, a, b = poly_of(net, backward=False)
    encoder = net.base_model.encoder
    per_token = sum(m.in_features * m.out_features for m in encoder.modules() if isinstance(m, torch.nn.Linear))
    assert a == 2 * per_token  # every encoder matrix once per token, a multiply-add = 2 FLOPs
    layers, hidden = net.config.num_hidden_layers, net.config.hidden_size
    assert b == 4 * hidden * layers  # QKᵀ and AV: 2·L²·d each, per layer (the CPU flash kernel is counted)
    assert c > 0  # the head, once per example


def test_training_coefficients(tiny_bert):
    fwd, full = poly_of(model(tiny_bert), False), poly_of(model(tiny_bert), True)
    # full fine-tuning: activation and weight gradients of every matrix (2× forward); attention in training mode
    # (dropout on its probabilities) runs as two batched matmuls, whose backward is 2× forward as well
    assert full[1] == 3 * fwd[1]
    assert full[2] == 3 * fwd[2]
    lora = poly_of(model(tiny_bert, "lora"), True)
    # LoRA: no weight gradients of the frozen base matrices, no activation gradients below the first adapter (layer
    # 0's query), and the adapters' own small matmuls: about 2× forward
    assert 1.9 * fwd[1] < lora[1] < 2.1 * fwd[1]


@pytest.mark.parametrize("backward", [False, True])
def test_polynomial_sums_to_the_count_of_real_batches(tiny_bert, backward):
    """The per-example sum equals torch's count of whole batches of equal-length examples."""
    net = model(tiny_bert, "lora")
    poly = poly_of(net, backward)
    for length, rows in ((5, 3), (9, 2)):
        def step():
            logits = net(**inputs(length, rows)).logits
            if backward:
                logits.sum().backward()

        with contextlib.nullcontext() if backward else torch.no_grad():
            assert flops.count(step) == flops.total(poly, [length] * rows)
    net.zero_grad(set_to_none=True)


def test_counting_leaves_the_model_and_rng_alone(tiny_bert):
    net = model(tiny_bert)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    poly_of(net, backward=True)
    assert torch.equal(torch.rand(3), expected)
    assert all(p.grad is None for p in net.parameters())


def test_runs_record_flops(tmp_path, tiny_bert, tiny_data):
    arms = '[[arms]]\nmethod = "lora"\nr = 4\n[[arms]]\nmethod = "frozen"\n[[arms]]\nmethod = "untrained"\n'
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, arms)
    assert main(["run", str(study), "--store", str(tmp_path / "store"), "--no-report"]) == 0
    results = [json.loads(p.read_text()) for p in (tmp_path / "store").glob("*/result.json")]
    by_method = {r["config"]["method"]: r["costs"] for r in results}
    assert by_method["lora"]["train_flops"] > by_method["frozen"]["train_flops"] > 0
    assert by_method["lora"]["train_flops_per_s"] > 0 and by_method["lora"]["eval_flops"] > 0
    assert by_method["untrained"]["train_flops"] is None and by_method["untrained"]["eval_flops"] > 0
    assert main(["report", str(tmp_path / "store")]) == 0
    report = (tmp_path / "store" / "report" / "report.md").read_text()
    assert "Train GFLOP/s" in report  # the achieved FLOP/s beside the training time

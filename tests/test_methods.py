"""Each method trains exactly the parameters it should; counts are exact; LoRA matches r·(d_in+d_out)·#targets."""

import pytest
import torch

from peftbench import methods
from peftbench.models import build_classifier

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "auto", "bias": "none"}


def prepared(model_dir, method, params=None, pooling="auto"):
    torch.manual_seed(0)
    backbone = build_classifier(str(model_dir), 3, pooling)
    params = {**LORA, **(params or {})} if method == "lora" else (params or {})
    model = methods.prepare(method, backbone, params)
    return backbone, model, methods.count_parameters(model, methods.resolve_head(backbone, params))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fixture, head", [("tiny_bert", {"pooler", "classifier"}),
                                           ("tiny_distilbert", {"pre_classifier", "classifier"}),
                                           ("tiny_roberta", {"classifier"}),
                                           ("tiny_minilm_like", {"classifier"})])
def test_frozen_trains_the_whole_head_and_nothing_else(request, fixture, head):
    _, model, counts = prepared(request.getfixturevalue(fixture), "frozen")
    names = trainable_names(model)
    assert names and all(any(h in n.split(".") for h in head) for n in names)
    assert {h for h in head if any(h in n.split(".") for n in names)} == head
    assert counts["adapter"] == 0 and counts["trainable"] == counts["head"]


def test_full_trains_everything(tiny_bert):
    backbone, model, counts = prepared(tiny_bert, "full")
    assert counts["trainable"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["trainable"]
    assert counts["trainable_pct"] > 100  # the head is on top of the base model


def test_untrained_trains_nothing(tiny_bert):
    _, model, counts = prepared(tiny_bert, "untrained")
    assert counts["trainable"] == 0 and counts["head"] == 0


@pytest.mark.parametrize("fixture, targets, d", [("tiny_bert", 2, 32), ("tiny_distilbert", 2, 32),
                                                 ("tiny_roberta", 2, 32), ("tiny_minilm_like", 2, 32)])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_lora_adapter_count_matches_formula_and_head_is_trainable(request, fixture, targets, d, r):
    backbone, model, counts = prepared(request.getfixturevalue(fixture), "lora", {"r": r})
    layers = 2
    assert counts["adapter"] == r * (d + d) * targets * layers
    head_trainable = sum(p.numel() for n, p in model.named_parameters()
                         if p.requires_grad and "modules_to_save" in n)
    assert head_trainable > 0 and counts["head"] == head_trainable
    assert counts["trainable"] == counts["adapter"] + counts["head"]
    assert counts["total"] == counts["base_model"] + counts["head"] + counts["adapter"]
    assert counts["trainable_pct"] == pytest.approx(100 * counts["trainable"] / counts["base_model"])
    # nothing of the encoder itself trains
    assert all("lora_" in n or "modules_to_save" in n for n in trainable_names(model))


def test_distilbert_pre_classifier_and_bert_pooler_are_saved_by_lora(tiny_bert, tiny_distilbert):
    _, bert, _ = prepared(tiny_bert, "lora")
    _, distil, _ = prepared(tiny_distilbert, "lora")
    assert any("pooler" in n and "modules_to_save" in n for n in trainable_names(bert))
    assert any("pre_classifier" in n and "modules_to_save" in n for n in trainable_names(distil))


def test_bad_target_module_lists_valid_names(tiny_bert):
    with pytest.raises(ValueError, match=r"q_lin matches no linear layer of bert; valid names: .*query.*value"):
        prepared(tiny_bert, "lora", {"target_modules": ["q_lin"]})


def test_mean_pooling_is_picked_for_sentence_transformers_folders(tiny_minilm_like, tiny_bert):
    assert build_classifier(str(tiny_minilm_like), 2).pooling == "mean"
    assert build_classifier(str(tiny_bert), 2).pooling == "cls"
    assert build_classifier(str(tiny_bert), 2, pooling="mean").pooling == "mean"


def test_dora_and_rslora_pass_through_to_peft(tiny_bert):
    _, model, counts = prepared(tiny_bert, "lora", {"use_dora": True})
    assert any("lora_magnitude_vector" in n for n in trainable_names(model))
    assert counts["adapter"] == 4 * 64 * 2 * 2 + 32 * 2 * 2  # + one magnitude per output feature

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
    assert counts["trainable_pct"] == pytest.approx(100.0)  # of all parameters: full fine-tuning is exactly 100%


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
    assert counts["trainable_pct"] == pytest.approx(100 * counts["trainable"] / counts["total"])
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


# --------------------------------------------------------------------------------------------------------------------
# Head policies, target presets, head_lr (GitHub issue #16)
# --------------------------------------------------------------------------------------------------------------------

D, FFN, LAYERS = 32, 64, 2


def lora_with(model_dir, **params):
    """(backbone, model, counts, resolved names): names are resolved on the backbone before peft wraps it."""
    torch.manual_seed(0)
    backbone = build_classifier(str(model_dir), 3)
    params = {**LORA, **params}
    resolved = methods.resolved_names("lora", backbone, params)
    model = methods.prepare("lora", backbone, params)
    return backbone, model, methods.count_parameters(model, resolved["head"]), resolved


@pytest.mark.parametrize("fixture, preset, names, per_layer", [
    ("tiny_bert", "all-linear", ["query", "key", "value", "output.dense", "intermediate.dense"], 4 * 2 * D + 2 * (D + FFN)),
    ("tiny_bert", "attention", ["query", "key", "value", "attention.output.dense"], 4 * 2 * D),
    ("tiny_distilbert", "all-linear", ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"], 4 * 2 * D + 2 * (D + FFN)),
    ("tiny_distilbert", "mlp", ["lin1", "lin2"], 2 * (D + FFN)),
    ("tiny_roberta", "all-linear", ["query", "key", "value", "output.dense", "intermediate.dense"], 4 * 2 * D + 2 * (D + FFN)),
])
def test_target_presets_resolve_to_exact_names_and_counts(request, fixture, preset, names, per_layer):
    _, _, counts, resolved = lora_with(request.getfixturevalue(fixture), target_modules=preset)
    assert resolved["target_modules"] == names
    assert counts["adapter"] == LORA["r"] * per_layer * LAYERS


def test_bert_mlp_preset_names_layers_where_a_suffix_would_also_take_attention(tiny_bert):
    _, model, counts, resolved = lora_with(tiny_bert, target_modules="mlp")
    assert resolved["target_modules"] == ["intermediate.dense", "0.output.dense", "1.output.dense"]
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert not any("attention" in n for n in adapted) and len(adapted) == 2 * LAYERS
    assert counts["adapter"] == LORA["r"] * 2 * (D + FFN) * LAYERS


def test_all_linear_adapts_bert_pooler_when_only_the_classifier_is_the_head(tiny_bert):
    _, model, counts, resolved = lora_with(tiny_bert, target_modules="all-linear", head="classifier",
                                           bias="lora_only")
    assert resolved == {"head": ["classifier"], "target_modules": ["query", "key", "value", "dense"]}
    assert any("pooler.dense.lora_A" in n for n, _ in model.named_parameters())
    assert not any("pooler" in n and "modules_to_save" in n for n, _ in model.named_parameters())
    biases = LAYERS * (4 * D + FFN + D) + D  # every adapted layer's bias, the pooler's included
    assert counts["encoder_trainable"] == biases and counts["head"] == D * 3 + 3
    assert counts["trainable"] == counts["adapter"] + counts["head"] + biases


def test_presets_that_match_nothing_and_names_inside_the_head_are_refused(tiny_bert):
    from torch import nn

    from peftbench.models import Backbone

    class AttentionOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([nn.ModuleDict({"attention": nn.ModuleDict({"q": nn.Linear(4, 4)})})
                                        for _ in range(2)])
            self.classifier = nn.Linear(4, 2)

    backbone = Backbone(model=AttentionOnly(), pooling="cls", model_type="toy", path="")
    with pytest.raises(ValueError, match=r"^target_modules: mlp matches no linear layer of toy \(its linear layers "
                                         r"end like: q\)$"):
        methods.resolve_targets(backbone, "mlp")
    with pytest.raises(ValueError, match=r"target_modules: dense also matches bert.pooler.dense, which is in the "
                                         r"trained head .*\(output.dense, intermediate.dense\)"):
        lora_with(tiny_bert, target_modules=["dense"])


@pytest.mark.parametrize("head, trained", [("all", {"pooler", "classifier"}), ("classifier", {"classifier"}),
                                           (["pooler"], {"pooler"})])
def test_frozen_trains_exactly_the_head_policy(tiny_bert, head, trained):
    _, model, counts = prepared(tiny_bert, "frozen", {"head": head})
    parts = {p for n in trainable_names(model) for p in n.split(".")}
    assert trained <= parts and not ({"pooler", "classifier"} - trained) & parts
    assert counts["trainable"] == counts["head"] and counts["adapter"] == 0
    assert counts["total"] == counts["base_model"] + counts["head"]


def test_distilbert_classifier_policy_is_peft_default_and_includes_pre_classifier(tiny_distilbert):
    _, model, _, resolved = lora_with(tiny_distilbert, head="classifier")
    assert resolved["head"] == ["classifier"]
    assert {"pre_classifier", "classifier"} <= {p for n in trainable_names(model) if "modules_to_save" in n
                                                for p in n.split(".")}


def test_unknown_head_module_is_refused(tiny_bert):
    with pytest.raises(ValueError, match=r"^head: nope matches no module of the model \(expected all, classifier or "
                                         r"module names such as: pooler, classifier\)$"):
        prepared(tiny_bert, "frozen", {"head": ["nope"]})


def test_new_settings_at_their_defaults_stay_out_of_run_ids(tmp_path):
    from peftbench.config import expand_runs, validate_study

    def runs(**arm):
        raw = {"models": ["m"], "datasets": {"d": {"source": "builtin:rotten_tomatoes"}},
               "arms": [{"method": "lora", **arm}]}
        return expand_runs(validate_study(raw))

    (plain,) = runs()
    assert "head" not in plain.method_params and "head_lr" not in plain.train
    (same,) = runs(head="all")
    assert same.run_id == plain.run_id
    (other,) = runs(head="classifier", head_lr=1e-3)
    assert other.method_params["head"] == "classifier" and other.train["head_lr"] == 1e-3
    assert other.run_id != plain.run_id and other.arm == "lora+head=classifier r=8"
    assert len(runs(head_lr=[1e-3, 1e-2])) == 2  # sweepable like lr


def test_head_lr_gives_the_head_its_own_parameter_groups(tiny_bert):
    backbone, model, _ = prepared(tiny_bert, "lora")
    head = methods.resolve_head(backbone, LORA)
    for method, params in (("lora", {}), ("loraplus", {"loraplus_lr_ratio": 4.0})):
        opt = methods.make_optimizer(method, model, params, {"lr": 1e-3, "head_lr": 5e-2, "weight_decay": 0.01},
                                     torch.device("cpu"), head)
        names = {id(p): n for n, p in model.named_parameters()}
        lr_of = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
        assert set(lr_of) == trainable_names(model)
        assert all(lr == 5e-2 for n, (lr, _) in lr_of.items() if "modules_to_save" in n)
        assert all(lr != 5e-2 for n, (lr, _) in lr_of.items() if "lora_" in n)
        assert {wd for n, (_, wd) in lr_of.items() if "modules_to_save" in n and n.endswith("bias")} == {0.0}


@pytest.mark.parametrize("arm, message", [
    ('head = "pooler_only"', "arms[0].head: expected all, classifier or a list of module names, got 'pooler_only'"),
    ('target_modules = ["q_lin"]', "arm 'lora r=8'.target_modules: q_lin matches no linear layer of bert"),
    ('head = ["nope"]', "arm 'lora+head=nope r=8'.head: nope matches no module of the model"),
])
def test_validate_refuses_bad_heads_and_targets_with_one_line(tmp_path, tiny_bert, tiny_data, capsys, arm, message):
    from peftbench.cli import main
    from tests.conftest import write_study

    study = write_study(tmp_path / "study.toml", tiny_bert, tiny_data, f'[[arms]]\nmethod = "lora"\n{arm}\n')
    assert main(["validate", str(study), "--store", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(study) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "st").exists()


def test_a_run_stores_what_presets_resolved_to_and_trains_with_head_lr(tmp_path, tiny_bert, tiny_data):
    import json

    from peftbench.cli import main
    from peftbench.store import Store
    from tests.conftest import write_study

    study = write_study(tmp_path / "study.toml", tiny_bert, tiny_data, '[[arms]]\nmethod = "lora"\nr = 2\n'
                        'target_modules = "all-linear"\nhead = "classifier"\nbias = "lora_only"\nhead_lr = 1e-2\n'
                        'epochs = 1\n')
    assert main(["run", str(study), "--store", str(tmp_path / "st"), "--no-report"]) == 0
    (run_id,) = Store(tmp_path / "st").run_ids()
    result = json.loads((tmp_path / "st" / run_id / "result.json").read_text())
    config = json.loads((tmp_path / "st" / run_id / "config.json").read_text())
    assert result["status"] == "success" and config["train"]["head_lr"] == 1e-2
    assert config["method_params"]["target_modules"] == ["all-linear"]  # hashed as written ...
    assert result["resolved"] == {"head": ["classifier"], "target_modules": ["query", "key", "value", "dense"]}
    assert result["params"]["head"] == D * 2 + 2
    # the saved adapter (the pooler's LoRA and the adapted layers' biases included) reproduces the run's predictions
    from peftbench.runner import evaluate_saved

    again = evaluate_saved(tmp_path / "st" / run_id)
    assert again["accuracy"] == pytest.approx(result["metrics"]["test"]["accuracy"])

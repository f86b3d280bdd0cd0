"""The peft methods beyond plain LoRA: parameters pass to peft under its own names, counts are exact, and each trains.

rsLoRA, PiSSA, OLoRA (LoRA options), LoRA+ (its optimizer), AdaLoRA (its step hook and orthogonal regulariser),
(IA)³ and VeRA, on 2-layer 32-wide models (d = 32, FFN 64, two target matrices per layer).
"""

import json
from pathlib import Path

import pytest
import torch

from peftbench import methods
from peftbench.cli import main
from peftbench.config import BUILTIN_STUDIES, ConfigError, load_study
from peftbench.models import build_classifier
from peftbench.runner import evaluate_saved
from peftbench.spectrum import effective_weight, snapshot
from peftbench.store import load_results
from tests.conftest import write_study

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "auto", "bias": "none"}
LAYERS, D = 2, 32


def prepared(model_dir, method, params=None, total_steps=None):
    torch.manual_seed(0)
    backbone = build_classifier(str(model_dir), 2)
    spec = methods.METHODS[method]
    full = spec.finalize(spec.resolve_defaults({**(LORA if "r" in spec.params and method != "vera" else {}),
                                                **(params or {})}))
    model = methods.prepare(method, backbone, full, total_steps=total_steps)
    return backbone, model, methods.count_parameters(model, methods.resolve_head(backbone, full))


def assert_exact_split(backbone, model, counts):
    """trainable = adapter + head; nothing of the encoder itself trains; the whole head trains."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("modules_to_save" in n or any(k in n for k in ("lora_", "ia3_", "vera_lambda")) for n in trainable)
    assert counts["trainable"] == counts["adapter"] + counts["head"]
    assert counts["encoder_trainable"] == 0 and counts["head"] > 0
    assert counts["total"] == counts["base_model"] + counts["head"] + counts["adapter"]
    assert {"pooler", "classifier"} <= {p for n in trainable if "modules_to_save" in n for p in n.split(".")}


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"init_lora_weights": "pissa"},
                                     {"init_lora_weights": "olora"}, {"init_lora_weights": "gaussian"}])
def test_lora_options_keep_the_lora_count(tiny_bert, options):
    backbone, model, counts = prepared(tiny_bert, "lora", options)
    assert counts["adapter"] == 4 * (D + D) * 2 * LAYERS
    assert_exact_split(backbone, model, counts)


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_bert):
    _, model, _ = prepared(tiny_bert, "lora", {"r": 16, "lora_alpha": 8, "use_rslora": True})
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert query.scaling["default"] == pytest.approx(8 / 16**0.5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_move_the_principal_part_into_the_adapter(tiny_bert, init):
    torch.manual_seed(0)
    pretrained = snapshot(build_classifier(str(tiny_bert), 2).model, ["query"])
    _, model, _ = prepared(tiny_bert, "lora", {"init_lora_weights": init})
    name = "bert.encoder.layer.0.attention.self.query"
    layer = model.base_model.model.get_submodule(name)
    assert not torch.allclose(layer.base_layer.weight.detach(), pretrained[name])  # base holds the residual
    # ... and the model as a whole still computes the pretrained weight before training
    torch.testing.assert_close(effective_weight(layer), pretrained[name].double(), atol=1e-5, rtol=1e-5)


def test_loraplus_optimizer_gives_b_a_higher_learning_rate(tiny_bert):
    _, model, counts = prepared(tiny_bert, "loraplus", {"loraplus_lr_ratio": 8.0})
    assert counts["adapter"] == 4 * (D + D) * 2 * LAYERS
    opt = methods.make_optimizer("loraplus", model, {"loraplus_lr_ratio": 8.0}, {"lr": 1e-3, "weight_decay": 0.01},
                                 torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lr == pytest.approx(8e-3) for n, lr in lr_of.items() if "lora_B" in n)
    assert all(lr == pytest.approx(1e-3) for n, lr in lr_of.items() if "lora_A" in n)
    plain = methods.make_optimizer("lora", model, {}, {"lr": 1e-3, "weight_decay": 0.0}, torch.device("cpu"))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}  # the loop's AdamW


@pytest.mark.parametrize("method,params", [("loraplus", {"loraplus_lr_ratio": 8.0}),
                                           ("adalora", {"init_r": 6, "target_r": 2, "orth_reg_weight": 0.5})])
def test_method_optimizers_follow_the_fused_optimizer_switch(tiny_bert, method, params):
    _, model, _ = prepared(tiny_bert, method, params, total_steps=20)
    for fused in (True, False):
        opt = methods.make_optimizer(method, model, params, {"lr": 1e-3, "weight_decay": 0.0,
                                                             "fused_optimizer": fused}, torch.device("cpu"))
        assert bool(opt.defaults.get("fused")) is fused


def test_adalora_count_and_its_step_hook(tiny_bert):
    backbone, model, counts = prepared(tiny_bert, "adalora", {"init_r": 6, "target_r": 2}, total_steps=20)
    # per matrix: A (init_r × d_in) + B (d_out × init_r) + E (init_r)
    assert counts["adapter"] == (6 * D + D * 6 + 6) * 2 * LAYERS
    assert_exact_split(backbone, model, counts)
    assert methods.step_hook("adalora", model, {}) == model.base_model.update_and_allocate
    assert methods.step_hook("lora", model, {}) is None
    with pytest.raises(ValueError, match="number of training steps"):
        prepared(tiny_bert, "adalora", {"init_r": 6, "target_r": 2})


def test_adalora_orthogonal_regulariser_is_peft_s(tiny_bert):
    """peft's AdaLoraModel.forward adds orth_reg_weight · R to outputs.loss when labels are passed (a PeftModel
    without task_type does not even call it); our optimizer adds the gradient of the same R: the value must be
    peft's."""
    _, model, _ = prepared(tiny_bert, "adalora", {"init_r": 6, "target_r": 2, "orth_reg_weight": 0.5},
                           total_steps=20)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.tensor([[2, 6, 7, 3], [2, 8, 3, 0]])
    mask = (ids > 0).long()
    labels = torch.tensor([0, 1])
    model.eval()
    out = model.base_model(input_ids=ids, attention_mask=mask, labels=labels)  # AdaLoraModel.forward
    task = torch.nn.functional.cross_entropy(out.logits, labels)
    expected = (out.loss - task) / 0.5
    assert expected.item() > 0
    assert float(methods.adalora_orth_reg(model)) == pytest.approx(expected.item(), rel=1e-5)

    opt = methods.make_optimizer("adalora", model, {"orth_reg_weight": 0.5}, {"lr": 1e-2, "weight_decay": 0.0},
                                 torch.device("cpu"))
    before = float(methods.adalora_orth_reg(model))
    for _ in range(5):  # no task gradient: the steps only follow the regulariser
        opt.step()
        opt.zero_grad()
    assert float(methods.adalora_orth_reg(model)) < before


def test_adalora_target_r_must_be_below_init_r():
    raw = {"models": ["m"], "arms": [{"method": "adalora", "init_r": 4, "target_r": 4}]}
    from peftbench.config import expand_runs, validate_study

    with pytest.raises(ConfigError, match="target_r \\(4\\) must be below init_r \\(4\\)"):
        expand_runs(validate_study(raw))


@pytest.mark.parametrize("fixture, expected", [
    # key (d_out) + value (d_out) + attention.output.dense (input, d) + output.dense (input, FFN)
    ("tiny_bert", (D + D + D + 2 * D) * LAYERS),
    ("tiny_roberta", (D + D + D + 2 * D) * LAYERS),
    # k_lin + v_lin + lin2 (input, FFN)
    ("tiny_distilbert", (D + D + 2 * D) * LAYERS),
])
def test_ia3_count_per_architecture(request, fixture, expected):
    backbone, model, counts = prepared(request.getfixturevalue(fixture), "ia3")
    assert counts["adapter"] == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert counts["trainable"] == counts["adapter"] + counts["head"]
    assert all("ia3_l" in n or "modules_to_save" in n for n in trainable)


def test_ia3_targets_are_checked(tiny_bert):
    with pytest.raises(ValueError, match="feedforward_modules: value is not among target_modules"):
        prepared(tiny_bert, "ia3", {"target_modules": ["key"], "feedforward_modules": ["value"]})
    with pytest.raises(ValueError, match="target_modules: q_lin matches no linear layer"):
        prepared(tiny_bert, "ia3", {"target_modules": ["q_lin"]})
    _, _, counts = prepared(tiny_bert, "ia3", {"target_modules": ["value", "intermediate.dense"],
                                               "feedforward_modules": ["intermediate.dense"]})
    assert counts["adapter"] == (D + D) * LAYERS


@pytest.mark.parametrize("feedforward", ["intermediate.dense", [["intermediate.dense", "output.dense"]]])
def test_ia3_feedforward_modules_from_a_study(tiny_bert, feedforward):
    """One name, or several as a list of one list (a plain list of names would be a grid of runs)."""
    from peftbench.config import expand_runs, validate_study

    raw = {"models": [str(tiny_bert)], "arms": [{"method": "ia3", "feedforward_modules": feedforward,
                                                 "target_modules": ["value", "intermediate.dense", "output.dense"]}]}
    (run,) = expand_runs(validate_study(raw))
    backbone = build_classifier(str(tiny_bert), 2)
    model = methods.prepare("ia3", backbone, run.method_params)
    layer = model.base_model.model.bert.encoder.layer[0]
    assert layer.intermediate.dense.is_feedforward and not layer.attention.self.value.is_feedforward
    assert layer.output.dense.is_feedforward == isinstance(feedforward, list)


@pytest.mark.parametrize("r", [4, 16])
def test_vera_counts_only_its_scaling_vectors(tiny_bert, r):
    backbone, model, counts = prepared(tiny_bert, "vera", {"r": r})
    # λ_b (d_out) + λ_d (r) per adapted matrix; the shared random A and B are frozen buffers, not parameters
    assert counts["adapter"] == (D + r) * 2 * LAYERS
    assert_exact_split(backbone, model, counts)
    assert any("vera_A" in n for n, _ in model.named_buffers())
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())


ARMS = """
[[arms]]
method = "lora"
r = 4
use_rslora = true
init_lora_weights = ["pissa", "olora"]
lr = 1e-2

[[arms]]
method = "loraplus"
r = 4
loraplus_lr_ratio = 4.0
lr = 5e-3

[[arms]]
method = "adalora"
init_r = 6
target_r = 2
lr = 1e-2

[[arms]]
method = "ia3"
lr = 3e-2

[[arms]]
method = "vera"
r = 8
lr = 3e-2
"""


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, tiny_bert, tiny_data):
    tmp = tmp_path_factory.mktemp("peft-methods")
    study = write_study(tmp / "study.toml", tiny_bert, tiny_data, ARMS)
    store = tmp / "store"
    assert main(["run", str(study), "--store", str(store), "--no-report", "--set", "train.epochs=2",
                 "--set", "datasets.tiny.max_train=64", "--set", "train.bf16=false"]) == 0
    return store


def test_every_method_trains_saves_and_reloads(trained_store):
    df = load_results(trained_store)
    assert len(df) == 6 and (df["status"] == "success").all(), df[["arm", "error"]]
    for _, row in df.iterrows():
        run = Path(row["path"])
        result = json.loads((run / "result.json").read_text())
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert result["params"]["trainable"] == result["params"]["adapter"] + result["params"]["head"]
        # it trained: the encoder's adapted matrices moved away from the pretrained ones
        rows = json.loads((run / "spectrum.json").read_text())["rows"]
        assert rows and all(r["fro_norm"] > 0 for r in rows), row["arm"]
        # the saved adapter reproduces the stored test metrics
        metrics = evaluate_saved(run, device="cpu")
        assert metrics["accuracy"] == pytest.approx(result["metrics"]["test"]["accuracy"])
        assert metrics["loss"] == pytest.approx(result["metrics"]["test"]["loss"], abs=1e-5)


def test_adalora_run_allocates_ranks(trained_store):
    df = load_results(trained_store).set_index("method")
    config = json.loads((Path(df.loc["adalora", "path"]) / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] > 0
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert sum(kept) < 6 * len(kept)  # ranks were pruned from init_r towards target_r


def test_shipped_methods_study_covers_every_peft_method():
    study = load_study(BUILTIN_STUDIES / "methods.toml")
    arms = {a.method: a for a in study.arms}
    assert set(methods.PEFT_METHODS) | {"full", "frozen"} <= set(arms)
    lora_options = [a.method_params for a in study.arms if a.method == "lora"]
    assert any(p.get("use_dora") for p in lora_options) and any(p.get("use_rslora") for p in lora_options)
    assert {"pissa", "olora"} <= {p.get("init_lora_weights") for p in lora_options}
    assert study.models == ["builtin:minilm"]
    assert study.datasets["rotten_tomatoes"]["source"] == "builtin:rotten_tomatoes"

"""The fast paths predict what the plain paths predict (within numerical tolerance).

Length-bucketed batches, token-bounded batches (and steps), merged LoRA, the fused optimizer and bf16 autocast are
each compared with the plain way of doing the same thing, on tiny random models. How much faster they are is measured
by ``benchmarks/bench_speed.py``, not here.
"""

import json

import pandas as pd
import pytest
import torch

from peftbench import methods
from peftbench.cli import main
from peftbench.data import dataset_defaults, load_splits, tokenize
from peftbench.engine import TrainSettings, predict, train
from peftbench.models import build_classifier, load_tokenizer
from peftbench.executors import expected_work
from peftbench.runner import Prepared
from peftbench.store import Store
from tests.conftest import write_study

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "auto", "bias": "none"}


pytestmark = pytest.mark.usefixtures("one_thread")


def prepare(model_dir, data_dir, method="full", length_buckets=True) -> Prepared:
    splits = load_splits(dataset_defaults(source=str(data_dir)))
    tokenizer = load_tokenizer(str(model_dir))
    ids = {role: tokenize(getattr(splits, role)["text"].tolist(), tokenizer, 32) for role in ("train", "test")}
    labels = {role: torch.tensor(getattr(splits, role)["label"].to_numpy()) for role in ids}
    torch.manual_seed(0)
    backbone = build_classifier(str(model_dir), 2)
    model = methods.prepare(method, backbone, LORA if method == "lora" else {})
    return Prepared(model=model, splits=splits, ids=ids, labels=labels, device=torch.device("cpu"),
                    pad_id=tokenizer.pad_token_id, length_buckets=length_buckets)


def fit(p: Prepared, epochs=2, max_tokens=None, bf16=False, fused=True, lr=3e-3):
    """A few epochs with dropout off (eval mode), so the only differences between paths are numerical."""
    steps = p.steps("train", 16, seed=1, max_tokens=max_tokens)
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=0.01, lr_scheduler="linear", warmup_ratio=0.0,
                             max_grad_norm=1.0, early_stopping_patience=None, metric_for_best="loss", bf16=bf16,
                             steps_per_epoch=len(steps), fused_optimizer=fused)
    calls = iter(range(1, epochs + 1))  # a score that improves every epoch: the last epoch's weights are kept
    train(p.model, p.forward, lambda epoch: p.steps("train", 16, seed=epoch, max_tokens=max_tokens),
          lambda: {"loss": -next(calls), "accuracy": 0.0, "f1_macro": 0.0, "f1_weighted": 0.0}, settings, p.device,
          set_train_mode=p.model.eval)
    return p


def test_length_buckets_and_token_bounds_give_the_same_probabilities_as_one_example_at_a_time(tiny_bert, tiny_data):
    p = prepare(tiny_bert, tiny_data)
    one_by_one = p.predict_split("test", batch_size=1)  # no padding at all: the plain path
    bucketed = p.predict_split("test", batch_size=16)
    capped = p.predict_split("test", batch_size=16, max_tokens=40)
    p.length_buckets = False
    unsorted = p.predict_split("test", batch_size=16)
    for probs in (bucketed, capped, unsorted):
        torch.testing.assert_close(probs, one_by_one, atol=1e-5, rtol=1e-4)


def test_bucketed_steps_carry_less_padding_and_cover_every_example_once(tiny_bert, tiny_data):
    p = prepare(tiny_bert, tiny_data)
    bucketed = p.steps("train", 16, seed=3)
    p.length_buckets = False
    plain = p.steps("train", 16, seed=3)
    for steps in (bucketed, plain):
        assert sorted(i for _, idx in steps for i in idx) == list(range(len(p.ids["train"])))
    assert p.padding_pct(bucketed) < p.padding_pct(plain) / 2


def test_token_bounded_steps_train_like_whole_batches(tiny_bert, tiny_data):
    """Cutting a step into pieces to bound memory accumulates their gradients: the same update, the same model."""
    whole = fit(prepare(tiny_bert, tiny_data))
    p = prepare(tiny_bert, tiny_data)
    steps = p.steps("train", 16, seed=1, max_tokens=40)
    assert any(isinstance(step, list) for step in steps)
    assert len(steps) == len(p.steps("train", 16, seed=1))  # as many optimizer steps as without the bound
    for step in steps:
        for _, idx in (step if isinstance(step, list) else [step]):
            assert len(idx) == 1 or len(idx) * max(len(p.ids["train"][i]) for i in idx) <= 40
    pieces = fit(p, max_tokens=40)
    torch.testing.assert_close(pieces.predict_split("test", 16), whole.predict_split("test", 16), atol=2e-4,
                               rtol=1e-3)


def test_fused_adamw_trains_like_the_per_tensor_loop(tiny_bert, tiny_data):
    fused = fit(prepare(tiny_bert, tiny_data), fused=True)
    plain = fit(prepare(tiny_bert, tiny_data), fused=False)
    torch.testing.assert_close(fused.predict_split("test", 16), plain.predict_split("test", 16), atol=1e-4,
                               rtol=1e-3)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_distilbert", "tiny_minilm_like"])
def test_merged_lora_predicts_like_the_adapters_on_the_side(request, fixture, tiny_data):
    p = prepare(request.getfixturevalue(fixture), tiny_data, method="lora")
    with torch.no_grad():  # a non-zero update (B starts at zero) so that merging has something to merge
        for name, param in p.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    side = p.predict_split("test", 16)
    lora_model = p.model
    p.model = methods.merge_for_inference("lora", lora_model)
    assert p.model is not lora_model and not any("lora_" in n for n, _ in p.model.named_parameters())
    torch.testing.assert_close(p.predict_split("test", 16), side, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_roberta"])
def test_lora_does_no_gradient_work_on_frozen_weights(request, fixture, tiny_data):
    """LoRA is faster, not only smaller: no weight gradient of a frozen layer, and no embedding backward at all."""
    from torch.profiler import profile

    ops = {}
    for method in ("full", "lora"):
        p = prepare(request.getfixturevalue(fixture), tiny_data, method=method)
        logits, _ = p.forward(("train", list(range(8))))
        with profile() as prof:
            logits.sum().backward()
        ops[method] = {e.key: e.count for e in prof.key_averages()}
        with_grad = {n for n, prm in p.model.named_parameters() if prm.grad is not None}
        if method == "lora":
            assert with_grad and all("lora_" in n or "modules_to_save" in n for n in with_grad)
    assert ops["full"].get("aten::embedding_dense_backward") and not ops["lora"].get("aten::embedding_dense_backward")


def test_bf16_autocast_trains_and_agrees_with_fp32_on_most_predictions(tiny_bert, tiny_data):
    p32 = fit(prepare(tiny_bert, tiny_data), epochs=3)
    probs32 = p32.predict_split("test", 16)
    probs_bf16_eval = p32.predict_split("test", 16, bf16=True)
    assert (probs_bf16_eval.argmax(1) == probs32.argmax(1)).float().mean() >= 0.9
    assert (probs_bf16_eval - probs32).abs().max() < 0.05
    p16 = fit(prepare(tiny_bert, tiny_data), epochs=3, bf16=True)
    probs16 = p16.predict_split("test", 16, bf16=True)
    labels = p16.labels["test"]
    acc32, acc16 = ((probs == labels).float().mean().item() for probs in (probs32.argmax(1), probs16.argmax(1)))
    assert acc32 > 0.8 and abs(acc16 - acc32) <= 0.1
    assert (probs16.argmax(1) == probs32.argmax(1)).float().mean() >= 0.85


def test_runs_report_their_speed_settings_and_merging_does_not_change_predictions(tmp_path, tiny_bert, tiny_data,
                                                                                  capsys):
    arms = "[[arms]]\nmethod = \"lora\"\nr = 4\nlr = 1e-2\n"
    found = {}
    for merge in ("true", "false"):
        study = write_study(tmp_path / f"{merge}.toml", tiny_bert, tiny_data, arms)
        store = tmp_path / merge
        assert main(["run", str(study), "--store", str(store), "--no-report", "--set", "train.epochs=1",
                     "--set", "train.bf16=false", "--set", f"train.merge_for_eval={merge}"]) == 0
        (run_id,) = Store(store).run_ids()
        found[merge] = json.loads((store / run_id / "result.json").read_text())
        found[merge]["probs"] = pd.DataFrame(pd.read_parquet(store / run_id / "predictions.parquet")["probs"].tolist())
    speed = found["true"]["speed"]
    assert speed["merged_for_eval"] and not found["false"]["speed"]["merged_for_eval"]
    assert speed["bf16"] is False and speed["length_buckets"] is True and speed["fused_optimizer"] is True
    assert 0 <= speed["padding_pct"] < 50 and speed["torch_threads"] >= 1 and speed["split_steps"] == 0
    assert (found["true"]["probs"] - found["false"]["probs"]).abs().max().max() < 1e-4
    assert found["true"]["metrics"]["test"]["accuracy"] == found["false"]["metrics"]["test"]["accuracy"]


def test_study_eta_weighs_runs_by_expected_work(tmp_path, tiny_minilm_like, tiny_data, capsys):
    arms = "[[arms]]\nmethod = \"frozen\"\nlr = 1e-2\n[[arms]]\nmethod = \"full\"\nepochs = 1\n"
    study_path = write_study(tmp_path / "s.toml", tiny_minilm_like, tiny_data, arms)
    from peftbench.config import expand_runs, load_study

    frozen, full = expand_runs(load_study(study_path))
    assert expected_work(full) > expected_work(frozen)  # 1 epoch of full fine-tuning > one encoder pass
    assert main(["run", str(study_path), "--store", str(tmp_path / "st"), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert out.count("done   ") == 2 and out.count("study ETA") == 1  # the last run has nothing left to estimate


def test_one_autocast_region_for_all_prediction_batches_predicts_the_same(tiny_bert, tiny_data):
    """engine.predict enters autocast once, so its cache casts each trainable fp32 weight once (not once a batch):
    bit for bit the probabilities of an autocast region per batch."""
    from peftbench.engine import autocast

    p = prepare(tiny_bert, tiny_data)
    p.model.eval()
    batches = p.batches("test", 16, shuffle=False)
    with torch.no_grad():
        per_batch = []
        for batch in batches:
            with autocast(p.device, True):  # the code before: an autocast region per batch
                logits, _ = p.forward(batch)
            per_batch.append(torch.softmax(logits.float(), dim=-1))
    assert torch.equal(torch.cat(per_batch), predict(p.forward, batches, p.device, True))

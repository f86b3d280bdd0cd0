"""Packed runs (``train.pack_runs``): several LoRA runs trained in one forward/backward pass are the same runs as
trained alone. Without dropout a packed run's losses, validation metrics and predictions equal its solo run's (to
fp32 rounding; to bf16 tolerance under autocast); grouping is deterministic and recorded; runs that cannot share the
pass train alone and still succeed. Speed is measured by ``benchmarks/bench_mfu.py``, not here."""

import json

import pandas as pd
import pytest
import torch

from peftbench import methods, packing
from peftbench.cli import main
from peftbench.config import expand_runs, load_study
from peftbench.data import collate, dataset_defaults, load_splits, make_batches, tokenize
from peftbench.models import build_classifier, load_tokenizer
from peftbench.store import Store
from tests.conftest import tiny_vocab, write_study

ARMS = """
[[arms]]
method = "lora"
r = [2, 4]
lr = [3e-3, 1e-2]
lora_dropout = 0.0

[[arms]]
method = "full"
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory):
    """A tiny BERT without dropout: packed and solo runs then differ by rounding only."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("models") / "bert-nodrop"
    tokenizer = BertTokenizerFast(vocab=tiny_vocab(), do_lower_case=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_study(tmp_path, model, data, pack: int, *extra: str, seeds="[0, 1]") -> dict:
    study = write_study(tmp_path / f"pack{pack}.toml", model, data, ARMS, seeds=seeds)
    store = tmp_path / f"store{pack}"
    assert main(["run", str(study), "--store", str(store), "--no-report", "--set", "train.epochs=3",
                 "--set", f"train.pack_runs={pack}", *extra]) == 0
    out = {}
    for result in Store(store).results():
        config = result["config"]
        key = (config["method"], json.dumps(config["method_params"], sort_keys=True), config["train"]["lr"],
               config["seed"])
        run_dir = store / result["run_id"]
        result["losses"] = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").open()]
        result["probs"] = pd.DataFrame(pd.read_parquet(run_dir / "predictions.parquet")["probs"].tolist())
        out[key] = result
    return out


def test_runs_are_grouped_deterministically_by_what_they_share(tmp_path, tiny_bert, tiny_data):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS + "\n[[arms]]\nname = \"short\"\n"
                        "method = \"lora\"\nr = 2\nmax_length = 16\n", seeds="[0, 1, 2]")
    runs = expand_runs(load_study(study, overrides=["train.pack_runs=4"]))
    groups = packing.plan(runs)
    assert groups == packing.plan(list(runs))  # deterministic
    assert sorted(r.run_id for g in groups for r in g) == sorted(r.run_id for r in runs)  # each run once
    for group in groups:
        if group[0].method == "full" or group[0].train["max_length"] == 16:
            assert len(group) in (1, 3) and len({packing.pack_key(r) for r in group}) == 1
            assert group[0].method == "lora" or len(group) == 1  # full fine-tuning never packs
        else:
            assert 1 <= len(group) <= 4 and len({packing.pack_key(r) for r in group}) == 1
    lora = [r for r in runs if r.method == "lora" and r.train["max_length"] == 32]
    assert [len(g) for g in packing.plan(lora)] == [4, 4, 4]  # 2 ranks x 2 lrs x 3 seeds, 4 at a time
    short = [r for r in runs if r.train["max_length"] == 16]
    assert [len(g) for g in packing.plan(short)] == [3]  # a different max_length: a pack of its own
    one = expand_runs(load_study(study))
    assert all(len(g) == 1 for g in packing.plan(one))  # pack_runs = 1 (the default): every run alone
    # pack_runs enters the id of a run that can pack, not of one that cannot (full fine-tuning's ids stay)
    assert {r.run_id for r in one if r.method == "full"} == {r.run_id for r in runs if r.method == "full"}
    assert not {r.run_id for r in one if r.method == "lora"} & {r.run_id for r in runs if r.method == "lora"}


@pytest.mark.parametrize("arch", ["tiny_bert", "tiny_minilm_like", "tiny_distilbert", "tiny_roberta"])
def test_packed_forward_gives_each_run_its_solo_logits(arch, request, tiny_data):
    model_dir = request.getfixturevalue(arch)
    splits = load_splits(dataset_defaults(source=str(tiny_data)))
    tokenizer = load_tokenizer(str(model_dir))
    ids = tokenize(splits.train["text"].tolist(), tokenizer, 32)
    models = []
    for k, (r, targets) in enumerate([(2, "auto"), (4, "auto"), (8, "auto")]):
        torch.manual_seed(k)
        model = methods.prepare("lora", build_classifier(str(model_dir), 2),
                                {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": targets,
                                 "bias": "none"})
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA starts at B = 0: give the adapters something to add
                torch.nn.init.normal_(p, std=0.1)
        models.append(model.eval())
    pack = packing.Pack(models, "lora")
    batches = [make_batches([len(x) for x in ids], 8 + 4 * k, True, k)[0] for k in range(3)]
    inputs = [collate(ids, b, tokenizer.pad_token_id) for b in batches]
    with torch.no_grad():
        solo = [m(**x).logits for m, x in zip(models, inputs)]
        for runs in ([0, 1, 2], [2, 0], [1]):  # any subset, any order (runs that stopped early leave the pack)
            packed = pack.forward(runs, [inputs[k] for k in runs])
            for k, logits in zip(runs, packed):
                torch.testing.assert_close(logits, solo[k], atol=1e-5, rtol=1e-5)


def test_packed_runs_train_as_they_do_alone_without_dropout(tmp_path, no_dropout_bert, tiny_data):
    solo = run_study(tmp_path, no_dropout_bert, tiny_data, 1, "--set", "train.bf16=false")
    packed = run_study(tmp_path, no_dropout_bert, tiny_data, 8, "--set", "train.bf16=false")
    assert solo.keys() == packed.keys() and len(solo) == 10  # 4 LoRA arms + full, 2 seeds
    for key, a in solo.items():
        b = packed[key]
        assert a["status"] == b["status"] == "success"
        torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), atol=1e-5, rtol=1e-4)
        assert (a["probs"] - b["probs"]).abs().max().max() < 1e-4
        assert a["metrics"]["best_epoch"] == b["metrics"]["best_epoch"]
        if key[0] == "lora":
            info = b["speed"]["packing"]
            assert info["runs"] == 8 and len(info["run_ids"]) == 8 and b["run_id"] in info["run_ids"]
            assert info["run_ids"][info["index"]] == b["run_id"]
            assert "packing" not in a["speed"]
        else:
            assert "packing" not in b["speed"]


def test_packed_runs_under_bf16_autocast_stay_within_bf16_tolerance(tmp_path, no_dropout_bert, tiny_data):
    from peftbench.engine import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16: autocast is off, the fp32 test covers packing")
    solo = run_study(tmp_path, no_dropout_bert, tiny_data, 1, seeds="[0]")
    packed = run_study(tmp_path, no_dropout_bert, tiny_data, 4, seeds="[0]")
    for key, a in solo.items():
        torch.testing.assert_close(torch.tensor(packed[key]["losses"]), torch.tensor(a["losses"]), atol=2e-2,
                                   rtol=2e-2)


def test_packing_with_dropout_is_deterministic_and_recorded(tmp_path, tiny_bert, tiny_data):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_study(tmp_path / "a", tiny_bert, tiny_data, 4, "--set", "train.fast_dropout=true", seeds="[0]")
    again = run_study(tmp_path / "b", tiny_bert, tiny_data, 4, "--set", "train.fast_dropout=true", seeds="[0]")
    for key, a in first.items():
        assert a["losses"] == again[key]["losses"]
        assert a["probs"].equals(again[key]["probs"])
        if key[0] == "lora":
            assert a["speed"]["packing"]["runs"] == 4 and a["speed"]["fast_dropout"]


def test_runs_whose_frozen_weights_differ_train_alone(tmp_path, tiny_bert, tiny_data):
    splits = load_splits(dataset_defaults(source=str(tiny_data)))
    models = []
    for k in range(2):
        torch.manual_seed(k)
        backbone = build_classifier(str(tiny_bert), 2)
        if k:
            with torch.no_grad():
                next(backbone.model.bert.encoder.parameters()).add_(1.0)
        models.append(methods.prepare("lora", backbone, {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
                                                         "target_modules": "auto", "bias": "none"}))
    with pytest.raises(packing.PackError, match="frozen weights differ"):
        packing.Pack(models, "lora")
    assert len(splits.train) > 0
    assert not methods.packs("lora", {"use_dora": True}, {}) and not methods.packs("full", {}, {})
    assert not methods.packs("adalora", {}, {}) and methods.packs("loraplus", {"bias": "none"}, {})
    assert not methods.packs("lora", {}, {"gradient_checkpointing": True})
    assert not methods.packs("lora", {}, {"max_tokens_per_batch": 2048})


def test_runs_that_cannot_pack_train_exactly_as_alone_and_say_why(tmp_path, tiny_bert, tiny_data, monkeypatch):
    """A group whose models refuse to pack trains one run at a time, each from the generator state it had when it
    was built: with dropout on, the same losses as the runs trained alone."""
    solo = run_study(tmp_path, tiny_bert, tiny_data, 1, seeds="[0]")

    def refuse(*args, **kwargs):
        raise packing.PackError("refused by the test")

    monkeypatch.setattr(packing, "Pack", refuse)
    fallback = run_study(tmp_path, tiny_bert, tiny_data, 4, seeds="[0]")
    for key, a in solo.items():
        b = fallback[key]
        assert b["status"] == "success" and a["losses"] == b["losses"] and a["probs"].equals(b["probs"])
        if key[0] == "lora":
            assert b["speed"]["packing"] == {"runs": 1, "not_packed": "refused by the test"}


def test_an_encoder_outside_transformers_attention_functions_does_not_pack(tiny_bert, monkeypatch):
    from transformers import BertModel

    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(methods.prepare("lora", build_classifier(str(tiny_bert), 2),
                                      {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": "auto",
                                       "bias": "none"}))
    monkeypatch.setattr(BertModel, "_supports_attention_backend", False)  # as MPNet's or DeBERTa's own attention
    with pytest.raises(packing.PackError, match="attention functions"):
        packing.Pack(models, "lora")


def test_a_job_failing_leaves_the_others_of_its_pack_training():
    from peftbench.engine import Job, TrainSettings, train_packed

    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    models = [torch.nn.Linear(4, 2) for _ in range(3)]
    settings = TrainSettings(epochs=3, lr=1e-2, weight_decay=0.0, lr_scheduler="linear", warmup_ratio=0.0,
                             max_grad_norm=1.0, early_stopping_patience=None, metric_for_best="loss", bf16=False,
                             steps_per_epoch=3)
    calls = {k: 0 for k in range(3)}

    def evaluate(k):
        def run():
            calls[k] += 1
            if k == 1 and calls[k] == 2:
                raise RuntimeError("evaluation broke")
            return {"loss": -calls[k], "accuracy": 0.0, "f1_macro": 0.0, "f1_weighted": 0.0}
        return run

    jobs = [Job(m, None, lambda epoch: [slice(0, 4), slice(4, 8), slice(8, 12)], evaluate(k), settings)
            for k, m in enumerate(models)]

    def forward(active, batches):
        return [(models[k](x[b]), y[b]) for k, b in zip(active, batches)]

    results = train_packed(jobs, forward, torch.device("cpu"))
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "evaluation broke"
    for k in (0, 2):
        history, best_epoch, _ = results[k]
        assert len(history) == 3 and best_epoch == 3
    assert calls == {0: 3, 1: 2, 2: 3}

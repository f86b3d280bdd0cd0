"""Sentence pairs (``text_pair_column``): loading and identity of a pair, pair tokenization and its cache, the
TF-IDF and LLM arms' view of a pair, predictions and error analysis, a tiny pair study through the CLI, and the
one-line error of a missing pair column."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import RobertaConfig

from peftbench import baselines, llm, methods
from peftbench.cli import main
from peftbench.config import ConfigError, expand_runs, load_study, validate_study
from peftbench.data import Splits, collate, dataset_defaults, encode, encode_frame, load_splits, tokenize
from peftbench.models import load_tokenizer
from peftbench.report.document import _pair_cells
from peftbench.report.errors import confident_mistakes, disagreements
from peftbench.runner import evaluate_saved
from peftbench.store import Store
from tests import test_counts
from tests.conftest import FILLER, NEGATIVE, POSITIVE
from tests.test_bad_input import checksum, one_line_error

SENTIMENT = POSITIVE + NEGATIVE


def make_pairs(n: int, seed: int) -> pd.DataFrame:
    """Two short sentences with a sentiment word each; label 1 when the second repeats the first's word (so the
    label depends on the pair, not on either text alone)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(SENTIMENT)
        label = i % 2
        other = word if label else rng.choice([w for w in SENTIMENT if w != word])
        first = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))] + [word, str(seed), "-", str(i % 10)]
        second = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))] + [other]
        rows.append({"text": " ".join(first) + f" {i // 10}", "text_pair": " ".join(second), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> Path:
    """train.csv / test.csv with text, text_pair, label; the test split holds one pair twice with both labels (so
    every arm makes a mistake to analyse)."""
    folder = tmp_path_factory.mktemp("pairs") / "pairs"
    folder.mkdir()
    make_pairs(200, 1).to_csv(folder / "train.csv", index=False)
    test = make_pairs(40, 2)
    clash = test.iloc[[0]].assign(label=1 - test["label"].iloc[0])
    pd.concat([test, clash], ignore_index=True).to_csv(folder / "test.csv", index=False)
    (folder / "labels.txt").write_text("different\nsame\n")
    return folder


def spec(folder: Path, **changes) -> dict:
    return dataset_defaults(source=str(folder), text_pair_column="text_pair", **changes)


def test_pairs_load_with_their_second_text_and_are_one_identity(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    test = pd.DataFrame({"premise": ["a good film", "a bad film"] * 3, "hypothesis": [f"fine {i}" for i in range(6)],
                         "label": [1, 0] * 3})
    # train holds test's first pair exactly (a leak: dropped) and its premise with another hypothesis (kept)
    train = pd.concat([pd.DataFrame({"premise": ["a good film", "a good film"], "hypothesis": ["fine 0", "dull"],
                                     "label": [1, 0]}), test.assign(premise=test["premise"] + " too")] * 5,
                      ignore_index=True)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    splits = load_splits(dataset_defaults(source=str(folder), text_column="premise", text_pair_column="hypothesis",
                                          validation_fraction=0.2))
    assert list(splits.test.columns) == ["text", "text_pair", "label"]
    assert splits.part_names == ("premise", "hypothesis")
    every = pd.concat([splits.train, splits.validation])
    assert not ((every["text"] == "a good film") & (every["text_pair"] == "fine 0")).any()
    assert ((every["text"] == "a good film") & (every["text_pair"] == "dull")).sum() == 5
    assert splits.info["train_test_duplicates_dropped"] + splits.info["validation_test_duplicates_dropped"] == 5
    single = load_splits(dataset_defaults(source=str(folder), text_column="premise", validation_fraction=0.2))
    assert "text_pair" not in single.test.columns and single.part_names is None
    assert single.fingerprint != splits.fingerprint
    # by text alone, both "a good film" rows of train are test texts
    assert single.info["train_test_duplicates_dropped"] + single.info["validation_test_duplicates_dropped"] == 10


def test_an_empty_second_text_is_a_one_line_error(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    pd.DataFrame({"text": ["a", "b"], "text_pair": ["x", ""], "label": [0, 1]}).to_csv(folder / "train.csv",
                                                                                         index=False)
    with pytest.raises(ConfigError, match=r"dataset 'd' \(train\): empty or missing text in 1 rows \(first: row 1\); "
                                          r"remove them or fix column 'text_pair'"):
        load_splits(spec(folder))


def test_pairs_are_tokenized_as_pairs_and_cached_apart(tiny_bert, tmp_path):
    tokenizer = load_tokenizer(str(tiny_bert))
    texts, pairs_a, pairs_b = ["the good movie", "a bad plot"], ["was fun", "was dull"], ["was dull", "was fun"]
    cache = tmp_path / "tokens"
    a = encode(texts, tokenizer, 32, cache, pairs_a)
    expected = tokenizer(texts, pairs_a, truncation=True, max_length=32)
    assert a["input_ids"] == expected["input_ids"] and a["token_type_ids"] == expected["token_type_ids"]
    assert set(a["token_type_ids"][0]) == {0, 1}  # [CLS] text [SEP] → 0, pair [SEP] → 1
    b = encode(texts, tokenizer, 32, cache, pairs_b)
    assert b["input_ids"] != a["input_ids"]
    single = tokenize(texts, tokenizer, 32, cache)
    assert single == tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    assert len(list(cache.glob("*.pt"))) == 3  # one cache file per (texts, pairs) — pairs are part of the key
    assert encode(texts, tokenizer, 32, cache, pairs_a) == a  # served from the cache, segment ids included
    # truncation keeps both texts' boundaries: the pair fits max_length with [CLS] and both [SEP]s
    long = encode(["the movie " * 20], tokenizer, 12, None, ["a plot " * 20])
    ids = long["input_ids"][0]
    assert len(ids) == 12 and ids.count(tokenizer.sep_token_id) == 2
    frame = pd.DataFrame({"text": texts, "text_pair": pairs_a})
    assert encode_frame(frame, tokenizer, 32)["input_ids"] == a["input_ids"]
    batch = collate(a["input_ids"], np.array([0, 1]), 0, a["token_type_ids"])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["token_type_ids"][0].tolist()[:len(a["token_type_ids"][0])] == a["token_type_ids"][0]


def test_tfidf_and_llm_see_both_texts():
    frame = pd.DataFrame({"text": ["A man sleeps."], "text_pair": ["Someone rests."], "label": [1]})
    assert baselines.documents(frame) == [f"A man sleeps. {baselines.PAIR_SEPARATOR} Someone rests."]
    assert baselines.documents(frame[["text", "label"]]) == ["A man sleeps."]
    items = baselines.llm_items(frame)
    assert items == [("A man sleeps.", "Someone rests.")]
    message = llm.user_message(items, ("premise", "hypothesis"))
    assert message == "Classify this text.\n\nText 1:\nPremise: A man sleeps.\nHypothesis: Someone rests."
    assert "pair of two parts, Premise and Hypothesis" in llm.system_prompt(["entailment", "not"],
                                                                            ("premise", "hypothesis"))
    assert llm.user_message(["A man sleeps."]) == "Classify this text.\n\nText 1: A man sleeps."  # unchanged
    shots, _ = llm.pick_shots(items * 2, [0, 1], ["no", "yes"], 1, 0, truncate=5, side="first")
    assert {s for s, _ in shots} == {("A man", "Someo")}  # each part clipped on its own


def test_error_analysis_shows_both_texts():
    p = pd.DataFrame({"id": [0, 1], "text": ["a", "b"], "text_pair": ["x", "y"], "label": [0, 1], "pred": [1, 1],
                      "probs": [[0.2, 0.8], [0.1, 0.9]], "length": [2, 2]})
    m = confident_mistakes({0: p}, ["no", "yes"])
    assert m[["text", "text_pair"]].values.tolist() == [["a", "x"]]
    assert _pair_cells(m) == {"Text pair": ["x"]}
    _, d = disagreements({0: p}, {0: p.assign(pred=[0, 1])}, ["no", "yes"])
    assert d[["text", "text_pair", "right_under"]].values.tolist() == [["a", "x", "B"]]
    assert _pair_cells(d[["text"]]) == {}


PAIR_STUDY = """
name = "pairs"
seeds = [0]
models = ["{model}"]

[datasets.pairs]
source = "{data}"
text_pair_column = "{pair}"

[train]
epochs = 2
batch_size = 16
lr = 3e-3
max_length = 32

[[arms]]
method = "full"

[[arms]]
method = "lora"
r = 4
lr = 3e-2

[[arms]]
method = "tfidf"
"""


def test_a_tiny_pair_study_runs_end_to_end(tmp_path, tiny_bert, pair_data, capsys):
    study = tmp_path / "pairs.toml"
    study.write_text(PAIR_STUDY.format(model=tiny_bert, data=pair_data, pair="text_pair"))
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store)]) == 0
    capsys.readouterr()
    runs = {json.loads((d / "result.json").read_text())["config"]["method"]: d for d in store.iterdir()
            if (d / "result.json").is_file()}
    assert set(runs) == {"full", "lora", "tfidf"}
    test = pd.read_csv(pair_data / "test.csv")
    for method, folder in runs.items():
        result = json.loads((folder / "result.json").read_text())
        assert result["status"] == "success", result["error"]
        assert result["config"]["dataset"]["text_pair_column"] == "text_pair"
        preds = pd.read_parquet(folder / "predictions.parquet")
        assert list(preds.columns[:3]) == ["id", "text", "text_pair"]
        assert sorted(zip(preds["text"], preds["text_pair"])) == sorted(zip(test["text"], test["text_pair"]))
        words = preds["text"].str.split().str.len() + preds["text_pair"].str.split().str.len()
        assert (preds["length"] == words).all()
        assert result["metrics"]["test"]["accuracy"] < 1  # the clashing pair: one of its two labels is wrong
    # the encoder arms read the pair tokenization (segment ids included) from the token cache
    cached = [torch.load(f, weights_only=True) for f in (Store(store).cache_dir / "tokens").glob("*.pt")]
    assert len(cached) == 3 and all(set(c) == {"input_ids", "token_type_ids"} for c in cached)  # train/val/test
    assert "| Text pair |" in (store / "report" / "report.md").read_text()  # the mistakes show both texts
    # evaluating a stored run again tokenizes the pairs as training did
    again = evaluate_saved(runs["lora"], device="cpu")
    stored = json.loads((runs["lora"] / "result.json").read_text())["metrics"]["test"]
    assert again["accuracy"] == pytest.approx(stored["accuracy"])


def test_a_missing_pair_column_is_a_one_line_error_and_touches_nothing(tmp_path, tiny_bert, pair_data, capsys):
    study = tmp_path / "pairs.toml"
    study.write_text(PAIR_STUDY.format(model=tiny_bert, data=pair_data, pair="hypothesis"))
    store = tmp_path / "store"
    store.mkdir()
    before = checksum(store)
    for argv in (["run", str(study), "--store", str(store)], ["validate", str(study), "--store", str(store)]):
        err = one_line_error(capsys, argv)
        assert "dataset 'pairs' (train): no column 'hypothesis' (field text_pair_column; columns are: text, " \
               "text_pair, label)" in err
    assert checksum(store) == before
    assert main(["validate", str(study), "--store", str(store), "--no-data"]) == 0  # config-only checks pass


def test_the_pair_field_keeps_old_run_ids_and_is_checked(tmp_path):
    raw = {"models": ["m"], "datasets": {"d": {"source": "builtin:rotten_tomatoes"}}, "arms": [{"method": "full"}]}
    plain = validate_study(raw, tmp_path / "s.toml")
    assert "text_pair_column" not in plain.datasets["d"]  # at its default: not hashed, so stored run ids stay
    raw["datasets"]["d"]["text_pair_column"] = "hypothesis"
    paired = validate_study(raw, tmp_path / "s.toml")
    assert expand_runs(paired)[0].run_id != expand_runs(plain)[0].run_id
    raw["datasets"]["d"]["text_pair_column"] = "text"
    with pytest.raises(ConfigError, match=r"datasets\.d\.text_pair_column: 'text' is also the text_column"):
        validate_study(raw, tmp_path / "s.toml")


def test_the_glue_rte_study_is_a_pair_study(monkeypatch):
    study = load_study(Path(__file__).resolve().parents[1] / "peftbench" / "studies" / "glue_rte.toml")
    rte = study.datasets["rte"]
    assert (rte["source"], rte["config_name"], rte["text_column"], rte["text_pair_column"]) == (
        "nyu-mll/glue", "rte", "sentence1", "sentence2")
    runs = expand_runs(study)
    assert study.models == ["roberta-base"] and study.seeds == [0, 1, 2, 3, 4]
    lora = {r.arm: r for r in runs}["lora r=8"]
    assert (lora.method_params["r"], lora.method_params["lora_alpha"], lora.method_params["target_modules"]) == (
        8, 16, ["query", "value"])
    assert {r.method for r in runs} == {"full", "lora"} and len(runs) == (3 + 1) * 5
    # LoRA's trainable parameters: the adapters, 12 layers x (query, value) x (A + B) = 294,912 (the paper's "0.3M"),
    # and RoBERTa's head, dense 768x768 + out_proj 768x2 with biases = 592,130 (a shapes-only roberta-base)
    monkeypatch.setitem(test_counts.SEED_CONFIGS, "roberta-base", lambda: RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1))
    counts = test_counts.counts_for("roberta-base", 2, lora.method, lora.method_params)
    assert (counts["adapter"], counts["head"], counts["trainable"]) == (294_912, 592_130, 887_042)


def test_mean_pooled_models_read_the_segment_ids(tiny_minilm_like):
    """The frozen arm's cached sentence vectors (``features``) see a pair's segments, as its forward does."""
    from peftbench.models import MeanPoolClassifier, build_classifier

    model = build_classifier(str(tiny_minilm_like), 2).model.eval()
    assert isinstance(model, MeanPoolClassifier)
    tokenizer = load_tokenizer(str(tiny_minilm_like))
    enc = encode(["the good movie"], tokenizer, 32, None, ["was fun"])
    batch = collate(enc["input_ids"], np.array([0]), 0, enc["token_type_ids"])
    with torch.no_grad():
        paired, flat = model.features(**batch), model.features(batch["input_ids"], batch["attention_mask"])
        assert not torch.allclose(paired, flat)
        assert torch.allclose(model(**batch).logits, model.head(paired))


def test_the_llm_arm_asks_about_both_parts(monkeypatch, tmp_path):
    asked = []

    def complete(settings, messages, usage, cache_dir):  # the endpoint: "same" for every pair it is shown
        asked.append(messages)
        return "\n".join(f"{i}. same" for i in range(1, messages[-1]["content"].count("\nHypothesis: ") + 1))

    monkeypatch.setattr(llm, "complete", complete)
    frame = pd.DataFrame({"text": ["a good film", "a bad film"], "text_pair": ["it is good", "it is fine"],
                          "label": [1, 0]})
    splits = Splits(train=frame, validation=frame, test=frame, labels=["different", "same"],
                    part_names=("premise", "hypothesis"))
    out = methods.run_baseline("llm", {"model": "m", "shots": 1}, splits, seed=0, cache_dir=tmp_path)
    assert out.preds.tolist() == [1, 1]
    system, shots, _, question = asked[0]
    assert "Premise and Hypothesis" in system["content"]
    assert "Premise: a good film\nHypothesis: it is good" in question["content"]
    assert shots["content"].count("Premise: ") == 2  # one few-shot pair per class, shown the same way
    assert out.info["user_template"].endswith("Text 2:\nPremise: <text 2>\nHypothesis: <text pair 2>")

"""peftbench's parameter counts equal every figure the seed studies published, and the shipped studies are set up so.

The seed architectures are built from their transformers configs on the meta device (shapes only: no weights, no
download, a fraction of a second each) and go through peftbench's own path: ``models.classifier_from_config`` →
``methods.resolved_names`` → ``methods.prepare`` → ``methods.count_parameters``.
"""

import pytest
from transformers import BertConfig, DistilBertConfig, RobertaConfig

from peftbench import methods
from peftbench.config import BUILTIN_STUDIES, expand_runs, load_study
from peftbench.models import classifier_from_config

# The seeds' models, by their hub names: BertConfig() is bert-base-uncased (109,482,240 parameters with its pooler),
# DistilBertConfig() distilbert-base-uncased (66,362,880), and distilroberta-base is a 6-layer RoBERTa-base
# (82,118,400 with its pooler; RobertaForSequenceClassification has none).
SEED_CONFIGS = {
    "bert-base-uncased": BertConfig,
    "distilbert-base-uncased": DistilBertConfig,
    "distilroberta-base": lambda: RobertaConfig(num_hidden_layers=6, vocab_size=50265, max_position_embeddings=514,
                                                type_vocab_size=1),
}

# Banking77: all-linear LoRA adds, per rank, 12 layers x 13,824 (q, k, v, attention output: 4 x 1,536; intermediate
# and output: 2 x 3,840) + 1,536 (the pooler's dense layer); the fixed part is the classifier and the biases of the
# adapted layers (bias = "lora_only").
BANKING_PER_RANK = 12 * 13_824 + 1_536
BANKING_CLASSIFIER, BANKING_BIASES = 768 * 77 + 77, 83_712
BANKING = {"target_modules": "all-linear", "bias": "lora_only", "head": "classifier"}
IMDB = {"target_modules": ["query", "value"], "head": "classifier"}

# (model, labels, method, params, published trainable, published total as peft reports it or None)
PUBLISHED = [
    ("bert-base-uncased", 77, "lora", {"r": 4, **BANKING}, 812_621, 110_270_362),
    ("bert-base-uncased", 77, "lora", {"r": 9, **BANKING}, 1_649_741, 110_270_362 + 5 * BANKING_PER_RANK),
    ("bert-base-uncased", 77, "lora", {"r": 18, **BANKING}, 3_156_557, 110_270_362 + 14 * BANKING_PER_RANK),
    ("bert-base-uncased", 77, "lora", {"r": 32, **BANKING}, 5_500_493, 114_958_234),
    ("bert-base-uncased", 2, "lora", {"r": 4, **IMDB}, 148_994, None),
    ("bert-base-uncased", 2, "lora", {"r": 8, **IMDB}, 296_450, None),
    ("bert-base-uncased", 2, "lora", {"r": 16, **IMDB}, 591_362, None),
    ("bert-base-uncased", 2, "lora", {"r": 32, **IMDB}, 1_181_186, None),
    ("distilbert-base-uncased", 2, "frozen", {}, 592_130, None),
    ("distilbert-base-uncased", 2, "lora", {"r": 8, "target_modules": ["q_lin", "v_lin"]}, 739_586, None),
    ("distilbert-base-uncased", 2, "lora", {"r": 16, "target_modules": ["q_lin", "v_lin"]}, 887_042, None),
    ("distilroberta-base", 2, "lora", {"r": 8, "target_modules": ["query", "value"]}, 739_586, None),
]


def counts_for(model: str, labels: int, method: str, params: dict) -> dict:
    """peftbench's counts for one arm on a seed architecture (built on the meta device)."""
    spec = methods.METHODS[method]
    params = spec.finalize(spec.resolve_defaults(params))
    backbone = classifier_from_config(SEED_CONFIGS[model](), labels, weights=False)
    head = methods.resolved_names(method, backbone, params)["head"]
    return methods.count_parameters(methods.prepare(method, backbone, params), head)


@pytest.mark.parametrize("model, labels, method, params, trainable, total", PUBLISHED,
                         ids=[f"{m}-{meth}-r{p.get('r', '-')}-{n}" for m, n, meth, p, _, _ in PUBLISHED])
def test_counts_equal_the_published_figures(model, labels, method, params, trainable, total):
    counts = counts_for(model, labels, method, params)
    assert counts["trainable"] == trainable
    if total is not None:
        assert counts["total_with_head_copy"] == total  # peft's "all params": the classifier's frozen copy too
        assert counts["total"] == total - BANKING_CLASSIFIER  # peftbench counts every parameter once
    assert counts["total"] == counts["base_model"] + counts["head"] + counts["adapter"]


@pytest.mark.parametrize("r", [4, 9, 18, 32])
def test_banking77_count_decomposes_as_published(r):
    counts = counts_for("bert-base-uncased", 77, "lora", {"r": r, **BANKING})
    assert counts["adapter"] == r * BANKING_PER_RANK
    assert counts["head"] == BANKING_CLASSIFIER
    assert counts["encoder_trainable"] == BANKING_BIASES  # the adapted layers' biases (bias = "lora_only")
    assert counts["base_model"] == 109_482_240  # bert-base-uncased with its (frozen, adapted) pooler


def test_head_all_trains_the_pooler_and_all_linear_then_leaves_it_out():
    """head = "all" (the default): BERT's pooler trains whole, so all-linear does not adapt it."""
    default = counts_for("bert-base-uncased", 2, "lora", {"r": 4, "target_modules": ["query", "value"]})
    assert default["trainable"] == 148_994 + 590_592  # the pooler: 768 x 768 + 768
    counts = counts_for("bert-base-uncased", 77, "lora", {"r": 4, "target_modules": "all-linear"})
    assert counts["adapter"] == 4 * 12 * 13_824 and counts["head"] == BANKING_CLASSIFIER + 590_592


# Published trainable count of each shipped study arm (by label) that has one, and the label count of its data.
SHIPPED = {
    "banking77": (77, {"lora r=4": 812_621, "lora r=9": 1_649_741, "lora r=18": 3_156_557, "lora r=32": 5_500_493}),
    "imdb": (2, {"lora r=4": 148_994, "lora r=8": 296_450, "lora r=16": 591_362, "lora r=32": 1_181_186}),
    "imdb_distilroberta": (2, {"lora r=8": 739_586}),
    "sst2": (2, {"frozen": 592_130, "lora r=8": 739_586, "lora r=16": 887_042}),
}


@pytest.mark.parametrize("study", sorted(SHIPPED))
def test_shipped_studies_reproduce_their_seeds_counts(study):
    labels, published = SHIPPED[study]
    runs = {run.arm: run for run in expand_runs(load_study(BUILTIN_STUDIES / f"{study}.toml"))}
    assert set(published) <= set(runs)
    for arm, trainable in published.items():
        run = runs[arm]
        assert counts_for(run.model, labels, run.method, run.method_params)["trainable"] == trainable, arm

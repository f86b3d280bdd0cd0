"""Shared fixtures: tiny random models saved as real local model folders, and tiny real-looking datasets.

Nothing here downloads anything: the models are built in-process from transformers configs with a vocabulary made
for the test data, then saved with ``save_pretrained`` so peftbench loads them through its normal local-folder path.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak"]
FILLER = ["the", "movie", "was", "a", "plot", "actor", "film", "really", "quite", "and", "story", "scene"]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_texts(n: int, seed: int) -> pd.DataFrame:
    """Short synthetic reviews whose label is the sentiment word they contain (learnable, with some noise)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words) + f" #{seed}-{i}", "label": label})
    return pd.DataFrame(rows)


def tiny_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "#"] + POSITIVE + NEGATIVE + FILLER
    tokens += [str(d) for d in range(10)] + ["-"]
    return {t: i for i, t in enumerate(tokens)}


def save_tiny_model(folder: Path, arch: str = "bert", mean_pooling: bool = False) -> Path:
    """A 2-layer, 32-wide random encoder of the given architecture, saved with its tokenizer."""
    import torch
    from transformers import (BertConfig, BertModel, BertTokenizerFast, DistilBertConfig, DistilBertModel,
                              RobertaConfig, RobertaModel)

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=tiny_vocab(), do_lower_case=True)
    n = tokenizer.vocab_size
    torch.manual_seed(0)
    if arch == "bert":
        model = BertModel(BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128))
    elif arch == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=n, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                 max_position_embeddings=128))
    elif arch == "roberta":
        model = RobertaModel(RobertaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=130, pad_token_id=0))
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if mean_pooling:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread (as the runner uses under ``OMP_NUM_THREADS``): reductions are summed in a
    thread-count-dependent order, tiny models gain nothing from threads, and on a busy machine idle-spinning OpenMP
    threads slow them 100x."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # environment.set_threads then leaves the count alone
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


@pytest.fixture(scope="session")
def tiny_minilm_like(tmp_path_factory) -> Path:
    """A BERT folder that declares sentence-transformers mean pooling, like the default MiniLM."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-st", "bert", mean_pooling=True)


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-distilbert", "distilbert")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-roberta", "roberta")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A local dataset folder like ../shared/data/*: train.csv, test.csv, labels.txt (validation is carved)."""
    folder = tmp_path_factory.mktemp("data") / "tiny"
    folder.mkdir()
    make_texts(400, seed=1).to_csv(folder / "train.csv", index=False)
    make_texts(60, seed=2).to_csv(folder / "test.csv", index=False)
    (folder / "labels.txt").write_text("negative\npositive\n")
    return folder


def write_study(path: Path, model: Path, data: Path, arms: str, extra: str = "", seeds: str = "[0]") -> Path:
    path.write_text(f"""
name = "tiny"
seeds = {seeds}
models = ["{model}"]
{extra}
[datasets.tiny]
source = "{data}"

[train]
epochs = 5
batch_size = 16
lr = 3e-3
max_length = 32
{arms}
""")
    return path


TINY_ARMS = """
[[arms]]
method = "untrained"

[[arms]]
method = "frozen"
lr = 1e-1

[[arms]]
method = "lora"
r = [2, 4]
lr = 3e-2

[[arms]]
method = "full"
"""

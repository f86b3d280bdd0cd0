"""The ``lstm`` arm: a BiLSTM trained from scratch over the study model's tokenizer, through the normal run path.

It trains through the CLI and learns the toy task, its parameter counts equal a hand computation of the layers'
sizes, seeded runs repeat exactly, padding does not change a text's prediction, predict works on its run folder and
export refuses it in one line."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoConfig

from peftbench import methods
from peftbench.cli import main
from peftbench.lstm import LSTMClassifier, build
from peftbench.store import load_results
from peftbench.config import BUILTIN_STUDIES, expand_runs, load_study
from tests.conftest import write_study
from tests.test_counts import counts_for

LSTM_ARM = """
[[arms]]
method = "lstm"
embedding_dim = 16
hidden_size = 12
lr = 1e-2
epochs = 20
"""
ARMS = '[[arms]]\nmethod = "untrained"\n' + LSTM_ARM
PARAMS = {"embedding_dim": 16, "hidden_size": 12, "num_layers": 1, "dropout": 0.2, "bidirectional": True,
          "pool": "mean"}


def _run(tmp: Path, model, data, arms: str = ARMS) -> pd.DataFrame:
    study = write_study(tmp / "s.toml", model, data, arms)
    assert main(["run", str(study), "--store", str(tmp / "store"), "--no-report", "--set", "train.bf16=false"]) == 0
    return load_results(tmp / "store").set_index("method")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, tiny_data):
    return _run(tmp_path_factory.mktemp("lstm"), tiny_bert, tiny_data)


def _result(runs, method="lstm") -> dict:
    return json.loads((Path(runs.loc[method, "path"]) / "result.json").read_text())


def hand_count(vocab: int, labels: int, embedding_dim: int, hidden_size: int, num_layers: int,
               bidirectional: bool, **_) -> tuple[int, int]:
    """(total, classifier) by the layers' formulas: nn.Embedding V·E; nn.LSTM per layer and direction
    4H·(input + H) weights and two 4H biases (input E for the first layer, H·directions above); nn.Linear D·L + L."""
    directions = 2 if bidirectional else 1
    recurrent = 0
    for layer in range(num_layers):
        width = embedding_dim if layer == 0 else hidden_size * directions
        recurrent += directions * (4 * hidden_size * (width + hidden_size) + 2 * 4 * hidden_size)
    classifier = hidden_size * directions * labels + labels
    return vocab * embedding_dim + recurrent + classifier, classifier


def test_lstm_trains_through_the_cli_and_beats_the_untrained_head(runs):
    assert runs.loc["lstm", "status"] == "success", runs.loc["lstm", "error"]
    result = _result(runs)
    assert result["metrics"]["epochs_run"] == 20 and result["resolved"] == {"head": ["classifier"]}
    lstm_acc, untrained_acc = runs.loc["lstm", "test_accuracy"], runs.loc["untrained", "test_accuracy"]
    assert lstm_acc > untrained_acc + 0.2 and lstm_acc >= 0.8, (lstm_acc, untrained_acc)
    lines = (Path(runs.loc["lstm", "path"]) / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["train_loss"] < json.loads(lines[0])["train_loss"]


def test_lstm_parameter_counts_equal_the_layer_formulas(runs, tiny_bert):
    vocab = AutoConfig.from_pretrained(tiny_bert).vocab_size
    total, classifier = hand_count(vocab, 2, **PARAMS)
    params = _result(runs)["params"]
    assert params == {"base_model": total - classifier, "total": total, "total_with_head_copy": total,
                      "trainable": total, "adapter": 0, "head": classifier, "encoder_trainable": total - classifier,
                      "trainable_pct": 100.0}
    for shape in ({"num_layers": 2, "bidirectional": True}, {"num_layers": 3, "bidirectional": False}):
        spec = {**PARAMS, **shape}
        model = build(vocab, 5, spec)
        counts = methods.count_parameters(model, ["classifier"])
        assert (counts["total"], counts["head"]) == hand_count(vocab, 5, **spec)
        assert counts["trainable"] == counts["total"] and counts["trainable_pct"] == 100.0


SHIPPED = [("imdb", "bert-base-uncased", 30_522, 4_171_522),
           ("imdb_distilroberta", "distilroberta-base", 50_265, 6_698_626)]


@pytest.mark.parametrize("study, model, vocab, total", SHIPPED)
def test_shipped_imdb_studies_have_the_lstm_row_with_its_documented_count(study, model, vocab, total):
    runs = [r for r in expand_runs(load_study(BUILTIN_STUDIES / f"{study}.toml")) if r.method == "lstm"]
    assert runs and runs[0].arm == "lstm" and runs[0].model == model and runs[0].train["epochs"] == 10
    counts = counts_for(model, 2, "lstm", runs[0].method_params)
    assert counts["total"] == counts["trainable"] == total == hand_count(vocab, 2, **runs[0].method_params)[0]


def test_seeded_lstm_runs_repeat_exactly(runs, tmp_path, tiny_bert, tiny_data):
    again = _run(tmp_path, tiny_bert, tiny_data, LSTM_ARM)
    first, second = _result(runs), json.loads((Path(again.loc["lstm", "path"]) / "result.json").read_text())
    assert first["config"]["method_params"] == second["config"]["method_params"]
    assert first["metrics"] == second["metrics"]
    probs = [np.stack(pd.read_parquet(Path(r.loc["lstm", "path"]) / "predictions.parquet")["probs"].to_numpy())
             for r in (runs, again)]
    np.testing.assert_array_equal(probs[0], probs[1])


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_padding_does_not_change_a_texts_logits(pool):
    torch.manual_seed(0)
    model = LSTMClassifier(vocab_size=30, num_labels=3, embedding_dim=8, hidden_size=6, num_layers=2, pool=pool).eval()
    short, long = [5, 9, 2], [4, 4, 7, 1, 3, 8]
    alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    batch = torch.tensor([short + [0, 0, 0], long])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    padded = model(input_ids=batch, attention_mask=mask).logits
    torch.testing.assert_close(padded[0], alone[0])
    other_pad = model(input_ids=torch.tensor([short + [17, 29, 3], long]), attention_mask=mask).logits
    torch.testing.assert_close(other_pad, padded)


def test_predict_uses_an_lstm_run_and_export_refuses_it_in_one_line(runs, tmp_path, capsys):
    run_dir = runs.loc["lstm", "path"]
    stored = pd.read_parquet(Path(run_dir) / "predictions.parquet").sort_values("id")
    stored[["text"]].to_csv(tmp_path / "in.csv", index=False)
    assert main(["predict", run_dir, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "p.csv"),
                 "--batch-size", "7"]) == 0
    preds = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(preds[["prob_negative", "prob_positive"]].to_numpy(),
                               np.stack(stored["probs"].to_numpy()), atol=1e-5)
    capsys.readouterr()
    assert main(["export", run_dir, str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lstm run is not a transformers model" in err and "peftbench predict" in err
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("setting, message", [
    ("hidden_size = 0", "hidden_size: expected an integer >= 1, got 0"),
    ("dropout = 1.5", "dropout: expected a probability in [0, 1), got 1.5"),
    ("bidirectional = 3", "bidirectional"),
    ('pool = "max"', "pool: expected last or mean, got 'max'"),
])
def test_bad_lstm_settings_exit_2_with_one_line(tmp_path, tiny_bert, tiny_data, capsys, setting, message):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, f'[[arms]]\nmethod = "lstm"\n{setting}\n')
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "s.toml" in err, err

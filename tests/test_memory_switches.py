"""Memory switches for big models (issue 16, point 5): gradient checkpointing gives the plain path's results;
bf16_weights casts the frozen weights only, keeps trainable ones fp32, and is recorded."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from peftbench import methods
from peftbench.cli import main
from peftbench.engine import bf16_supported
from peftbench.store import load_results
from tests.conftest import write_study

ARMS = '[[arms]]\nmethod = "lora"\nr = 2\nlr = 3e-2\n'


def _probs(store, run_id):
    return np.stack(pd.read_parquet(store / run_id / "predictions.parquet")["probs"].to_numpy())


def test_gradient_checkpointing_gives_the_plain_results(tmp_path, tiny_bert, tiny_data):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS, extra="")
    common = ["--set", "train.bf16=false", "--set", "train.epochs=2", "--no-report", "--threads", "1"]
    assert main(["run", str(study), "--store", str(tmp_path / "a")] + common) == 0
    assert main(["run", str(study), "--store", str(tmp_path / "b"), "--set", "train.gradient_checkpointing=true"]
                + common) == 0
    a, b = load_results(tmp_path / "a").iloc[0], load_results(tmp_path / "b").iloc[0]
    assert a["run_id"] != b["run_id"]  # a different setting: a different run
    np.testing.assert_allclose(_probs(tmp_path / "a", a["run_id"]), _probs(tmp_path / "b", b["run_id"]), atol=1e-5)
    speed = json.loads((tmp_path / "b" / b["run_id"] / "result.json").read_text())["speed"]
    assert speed["gradient_checkpointing"] is True


def test_default_switches_stay_out_of_the_run_config(tmp_path, tiny_bert, tiny_data):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS)
    assert main(["run", str(study), "--store", str(tmp_path / "s"), "--no-report", "--set", "train.epochs=1"]) == 0
    config = json.loads(next((tmp_path / "s").glob("*/config.json")).read_text())
    assert "gradient_checkpointing" not in config["train"] and "bf16_weights" not in config["train"]


def test_bf16_weights_casts_only_frozen_parameters(tmp_path, tiny_bert, tiny_data):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert methods.hold_frozen_in_bf16(model) == 20
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS)
    assert main(["run", str(study), "--store", str(tmp_path / "w"), "--no-report", "--set", "train.epochs=1",
                 "--set", "train.bf16_weights=true"]) == 0
    row = load_results(tmp_path / "w").iloc[0]
    speed = json.loads((tmp_path / "w" / row["run_id"] / "result.json").read_text())["speed"]
    native = bf16_supported(torch.device("cpu"))
    assert speed["bf16_weights"] is native  # ignored (and recorded so) where bf16 autocast does not run
    assert (speed["bf16_weight_params"] > 0) is native
    assert row["status"] == "success"


@pytest.mark.parametrize("value", ["yes", 1])
def test_bad_switch_value_is_one_line(tmp_path, tiny_bert, tiny_data, capsys, value):
    study = write_study(tmp_path / "s.toml", tiny_bert, tiny_data, ARMS)
    assert main(["validate", str(study), "--no-data", "--set", f"train.gradient_checkpointing={value!r}"
                 if isinstance(value, str) else f"train.gradient_checkpointing={value}"]) == 2
    assert "train.gradient_checkpointing: expected true or false" in capsys.readouterr().err


def test_bf16_weights_predicts_what_autocast_of_fp32_weights_predicts(tiny_bert):
    """Under bf16 autocast the matmuls see the same bf16 weights either way; only the few ops autocast keeps in fp32
    (LayerNorm, embeddings' sum) see rounded weights: the probabilities agree within bf16 tolerance."""
    from peftbench.data import collate
    from peftbench.models import build_classifier

    torch.manual_seed(0)
    model = methods.prepare("lora", build_classifier(str(tiny_bert), 2),
                            {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": "auto", "bias": "none"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained-looking adapter
    model.eval()
    inputs = collate([[2, 7, 8, 9, 10, 3], [2, 11, 12, 3], [2, 7, 3]], np.arange(3), 0)

    def probs():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.softmax(model(**inputs).logits.float(), -1)

    plain = probs()
    assert methods.hold_frozen_in_bf16(model) > 0
    assert torch.allclose(probs(), plain, atol=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

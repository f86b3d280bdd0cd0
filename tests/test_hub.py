"""Offline hub ids fail fast with one line (issue 16: validate must not hang retrying the network)."""

from __future__ import annotations

import sys

import pytest

from peftbench import hub
from peftbench.cli import main


@pytest.fixture
def unreachable_hub(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "0")  # restored after the test, whatever go_offline sets
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], name, getattr(sys.modules[module], name))
    monkeypatch.setenv("PEFTBENCH_HUB_HOST", "hub.invalid")  # never resolves
    hub.ensure_reachable.cache_clear()
    yield
    hub.ensure_reachable.cache_clear()


def test_hub_dataset_offline_is_one_line_exit_2(tmp_path, unreachable_hub, capsys):
    study = tmp_path / "s.toml"
    study.write_text('[datasets.sst2]\nsource = "stanfordnlp/sst2"\n[[arms]]\nmethod = "majority"\n')
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hub is unreachable" in err and "datasets.sst2.source" in err


def test_hub_model_offline_is_one_line_exit_2(tmp_path, unreachable_hub, tiny_data, capsys):
    study = tmp_path / "s.toml"
    study.write_text(f'models = ["no-such-org/no-such-model"]\n[datasets.tiny]\nsource = "{tiny_data}"\n'
                     '[[arms]]\nmethod = "full"\n')
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hub is unreachable" in err

"""Spectrum analysis: effective rank of known spectra, ΔW of each method, spectrum.json from real runs, the report
helpers, and a failure there never failing a run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from peftbench import methods, runner, spectrum
from peftbench.cli import main
from peftbench.models import build_classifier
from peftbench.store import Store, load_results
from tests.conftest import write_study


@pytest.mark.parametrize("values, rank90, stable", [
    ([1.0, 0.0, 0.0], 1, 1.0),
    ([1.0, 1.0, 1.0, 1.0], 4, 4.0),           # flat: 90% needs all four
    ([3.0, 1.0, 0.1], 2, (9 + 1 + 0.01) / 9),  # 9/10.01 < 90% ≤ 10/10.01
    ([0.0, 0.0], 0, 0.0),                      # no update at all
])
def test_effective_and_stable_rank(values, rank90, stable):
    assert spectrum.effective_rank(torch.tensor(values)) == rank90
    assert spectrum.stable_rank(torch.tensor(values)) == pytest.approx(stable)


def test_energy_threshold_is_a_parameter():
    s = torch.tensor([2.0, 1.0, 1.0])  # energies 4, 1, 1 of 6
    assert spectrum.effective_rank(s, 0.5) == 1 and spectrum.effective_rank(s, 0.8) == 2
    assert spectrum.effective_rank(s, 0.99) == 3


def test_full_fine_tuning_update_of_known_rank(tiny_bert):
    torch.manual_seed(0)
    model = build_classifier(str(tiny_bert), 2).model
    before = spectrum.snapshot(model, ["query", "value"])
    assert sorted(before) == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    with torch.no_grad():  # a rank-2 update to layer 1's query, nothing elsewhere
        u, v = torch.randn(32, 2), torch.randn(2, 32)
        model.bert.encoder.layer[1].attention.self.query.weight += u @ v
    rows = {r["name"]: r for r in spectrum.layer_spectra(model, before, ["query", "value"])}
    q1 = rows["bert.encoder.layer.1.attention.self.query"]
    assert q1["layer"] == 1 and q1["module"] == "query" and q1["shape"] == [32, 32]
    assert q1["effective_rank_90"] <= 2 and q1["singular_values"][2] < 1e-5
    assert q1["fro_norm"] == pytest.approx(float(torch.linalg.matrix_norm((u @ v).double())), rel=1e-5)
    assert rows["bert.encoder.layer.0.attention.self.value"]["fro_norm"] == 0
    assert rows["bert.encoder.layer.0.attention.self.value"]["effective_rank_90"] == 0


def _peft_model(tiny_bert, method, params, total_steps=None):
    torch.manual_seed(0)
    backbone = build_classifier(str(tiny_bert), 2)
    spec = methods.METHODS[method]
    params = spec.finalize(spec.resolve_defaults(params))
    targets = methods.spectrum_targets(method, backbone, params)
    before = spectrum.snapshot(backbone.model, targets)
    return methods.prepare(method, backbone, params, total_steps=total_steps), before, targets


def _randomise(model, *names):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.normal_()


def test_lora_update_is_b_a_scale_with_rank_at_most_r(tiny_bert):
    model, before, targets = _peft_model(tiny_bert, "lora", {"r": 3, "lora_alpha": 6})
    _randomise(model, "lora_B")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    name = "bert.encoder.layer.0.attention.self.query"
    delta = spectrum.effective_weight(layer) - before[name].double()
    torch.testing.assert_close(delta, layer.get_delta_weight("default").double(), atol=1e-5, rtol=1e-4)
    rows = spectrum.layer_spectra(model, before, targets)
    assert len(rows) == 4 and all(r["effective_rank_90"] <= 3 for r in rows)
    assert all(r["singular_values"][3] < 1e-6 * r["singular_values"][0] for r in rows)  # exactly rank 3


def test_ia3_update_is_a_rescaling(tiny_bert):
    model, before, targets = _peft_model(tiny_bert, "ia3", {})
    _randomise(model, "ia3_l")
    key = model.base_model.model.bert.encoder.layer[0].attention.self.key
    w = before["bert.encoder.layer.0.attention.self.key"].double()
    scale = key.ia3_l["default"].detach().double().view(-1, 1)  # output scaling: diag(l)·W
    torch.testing.assert_close(spectrum.effective_weight(key), scale * w, atol=1e-5, rtol=1e-5)
    ff = model.base_model.model.bert.encoder.layer[0].output.dense
    w = before["bert.encoder.layer.0.output.dense"].double()
    scale = ff.ia3_l["default"].detach().double().view(1, -1)  # feed-forward: input scaling, W·diag(l)
    torch.testing.assert_close(spectrum.effective_weight(ff), w * scale, atol=1e-5, rtol=1e-5)
    assert {r["module"] for r in spectrum.layer_spectra(model, before, targets)} == {"key", "value", "output.dense"}


@pytest.mark.parametrize("method, params, total_steps", [
    ("lora", {"r": 4, "use_dora": True}, None), ("vera", {"r": 8}, None),
    ("adalora", {"init_r": 4, "target_r": 2}, 10)])
def test_untrained_adapters_have_no_update(tiny_bert, method, params, total_steps):
    """At initialisation every method computes the pretrained weights: ΔW = 0 (up to float64 round-off)."""
    model, before, targets = _peft_model(tiny_bert, method, params, total_steps)
    rows = spectrum.layer_spectra(model, before, targets)
    assert len(rows) == 4
    assert all(r["rel_fro_norm"] < 1e-6 for r in rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_minilm_like, tiny_data):
    tmp = tmp_path_factory.mktemp("spectrum")
    arms = ('[[arms]]\nmethod = "lora"\nr = 2\nlr = 1e-2\n[[arms]]\nmethod = "full"\nlr = 1e-3\n'
            '[[arms]]\nmethod = "frozen"\nlr = 1e-2\n')
    study = write_study(tmp / "s.toml", tiny_minilm_like, tiny_data, arms)
    assert main(["run", str(study), "--store", str(tmp / "store"), "--no-report", "--set", "train.epochs=2",
                 "--set", "datasets.tiny.max_train=64", "--set", "train.bf16=false"]) == 0
    return tmp / "store"


def test_runs_store_spectra_of_the_same_matrices(store):
    df = load_results(store).set_index("method")
    assert not (Path(df.loc["frozen", "path"]) / "spectrum.json").exists()  # the encoder did not change
    lora, full = (spectrum.read_spectrum(df.loc[m, "path"]) for m in ("lora", "full"))
    assert [r["name"] for r in lora] == [r["name"] for r in full]
    assert [(r["layer"], r["module"]) for r in lora] == [(0, "query"), (0, "value"), (1, "query"), (1, "value")]
    for r in lora:
        assert 1 <= r["effective_rank_90"] <= 2 and len(r["singular_values"]) == 32
        assert 1 <= r["stable_rank"] <= 2 + 1e-9 and r["fro_norm"] > 0
    assert all(r["fro_norm"] > 0 for r in full)
    saved = json.loads((Path(df.loc["lora", "path"]) / "spectrum.json").read_text())
    assert saved["energy"] == 0.9 and saved["top"] == 64
    assert saved["intruder_k"] == 10 and saved["intruder_epsilons"] == [0.3, 0.5, 0.7]
    for r in lora + full:  # intruder dimensions of every adapted matrix, full fine-tuning included
        assert len(r["intruder_max_cos"]) == 10 and all(0 <= c <= 1 + 1e-9 for c in r["intruder_max_cos"])
        assert r["intruders"] == {e: spectrum.intruder_count(r["intruder_max_cos"], float(e))
                                  for e in ("0.3", "0.5", "0.7")}


def test_report_helpers(store):
    import matplotlib.figure

    rows_by_arm = spectrum.load_spectra(load_results(store))
    assert set(rows_by_arm) == {"lora r=2", "full"}
    table = spectrum.spectrum_table(rows_by_arm)
    assert set(table["module"]) == {"query", "value"} and (table["matrices"] == 2).all()
    fig = spectrum.spectrum_figure(rows_by_arm)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 3
    assert len(fig.axes[2].lines) == 4  # 2 arms × 2 modules
    lines = spectrum.spectrum_sentences(rows_by_arm, reference="full")
    k = int(table.query("arm == 'full'")["effective_rank_90_max"].max())
    assert any(line.startswith("full: the update to query has 90% of its energy in rank ≤") for line in lines)
    assert lines[-1].startswith(f"Reading: full's update needs rank ≤ {k}")
    assert spectrum.spectrum_sentences({}) == []


def test_a_failing_spectrum_never_fails_the_run(tmp_path, capsys):
    broken = {"targets": ["query"], "weights": {"query": torch.zeros(3, 3)}}
    model = nn.Module()
    model.query = nn.Linear(2, 2)  # wrong shape: the subtraction raises inside the analysis
    writer = Store(tmp_path).writer("0" * 16, {})
    runner._write_spectrum(writer, model, broken)
    assert not (writer.dir / "spectrum.json").exists()
    captured = capsys.readouterr()
    assert "spectrum analysis skipped" in captured.out + captured.err


def test_cumulative_energy_curve_reaches_one_with_the_full_spectrum():
    row = {"singular_values": [3.0, 1.0, 0.5], "fro_norm": float(np.sqrt(9 + 1 + 0.25))}
    curve = spectrum._energy_curve(row)
    assert curve[-1] == pytest.approx(1.0) and np.all(np.diff(curve) > 0)


def test_report_shows_the_spectrum_section_and_figure(store, tmp_path):
    from peftbench.report import write_report

    out = write_report(store, out_dir=tmp_path / "report")
    md = (out / "report.md").read_text()
    assert "Where the rank goes" in md
    assert "full: the update to query has 90% of its energy in rank ≤" in md
    assert (out / "plots" / "spectrum.png").stat().st_size > 1000
    assert "Where the rank goes" in (out / "report.html").read_text()
    assert "### Intruder dimensions" in md and "per run, ε=0.5" in md
    assert "lora r=2: " in md.split("### Intruder dimensions")[1]
    assert (out / "plots" / "intruders.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in saved["groups"][0]["intruders"]} == {"lora r=2", "full"}

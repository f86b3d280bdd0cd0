"""Study files: validation errors name the field, grids expand, run ids are content hashes, shipped studies load."""

from pathlib import Path

import pytest

from peftbench.config import (ConfigError, apply_overrides, expand_runs, load_study, read_study_file,
                              validate_study)

STUDIES = Path(__file__).resolve().parents[1] / "peftbench" / "studies"

BASE = {"models": ["m"], "datasets": {"d": {"source": "builtin:rotten_tomatoes"}},
        "arms": [{"method": "lora", "r": [4, 8]}, {"method": "full", "lr": [1e-5, 2e-5]}]}


def study(**changes):
    raw = {**BASE, **changes}
    return validate_study(raw, Path("/tmp/s.toml"))


def test_grid_expands_models_datasets_arms_lrs_and_seeds():
    runs = expand_runs(study(seeds=[0, 1, 2]))
    assert len(runs) == (2 + 2) * 3
    labels = sorted({r.arm for r in runs})
    assert labels == ["full", "lora r=4", "lora r=8"]
    assert {r.train["lr"] for r in runs if r.method == "full"} == {1e-5, 2e-5}


def test_lora_alpha_relative_to_rank_and_defaults():
    runs = expand_runs(study(arms=[{"method": "lora", "r": [4, 64], "lora_alpha": "2r"}]))
    assert {(r.method_params["r"], r.method_params["lora_alpha"]) for r in runs} == {(4, 8), (64, 128)}
    assert runs[0].method_params["target_modules"] == "auto"


def test_arm_settings_override_study_defaults():
    runs = expand_runs(study(train={"lr": 2e-5, "epochs": 3}, arms=[{"method": "lora", "lr": 1e-4}]))
    assert runs[0].train["lr"] == 1e-4 and runs[0].train["epochs"] == 3


def test_run_id_is_a_hash_of_the_config_not_of_labels():
    a = expand_runs(study(name="one"))
    b = expand_runs(study(name="two"))
    assert [r.run_id for r in a] == [r.run_id for r in b]
    c = expand_runs(study(train={"epochs": 5}))
    assert not {r.run_id for r in a} & {r.run_id for r in c}


def test_untrained_runs_ignore_the_lr_grid():
    runs = expand_runs(study(train={"lr": [1e-5, 1e-4]}, arms=[{"method": "untrained"}]))
    assert len(runs) == 1 and "lr" not in runs[0].train


@pytest.mark.parametrize("changes, message", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"train": {"epochz": 2}}, "train: unknown key 'epochz'"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
    ({"train": {"lr_scheduler": "cyclic"}}, "lr_scheduler: expected one of linear, cosine, constant"),
    ({"arms": [{"method": "lora", "r": 0}]}, "arms[0].r: expected a rank >= 1"),
    ({"arms": [{"method": "lora", "r": [4, -1]}]}, "arms[0].r: expected a rank >= 1"),
    ({"arms": [{"method": "lora", "rank": 4}]}, "arms[0]: unknown key 'rank'"),
    ({"arms": [{"method": "full", "r": 4}]}, "arms[0]: unknown key 'r'"),
    ({"arms": [{"method": "qlora"}]}, "arms[0].method: expected one of"),
    ({"arms": []}, "arms: expected at least one"),
    ({"seeds": ["a"]}, "seeds: expected an integer"),
    ({"datasets": {"d": {"source": "x", "text_col": "t"}}}, "datasets.d: unknown key 'text_col'"),
    ({"datasets": {"d": {"text_column": "t"}}}, "datasets.d.source: missing"),
    ({"arms": [{"method": "lora", "lora_alpha": "double"}]}, "lora_alpha: expected an integer or a multiple"),
    ({"report": {"metric": "auc"}}, "report.metric: expected one of accuracy"),
    ({"report": {"selection_metric": "f1"}}, "report.selection_metric: expected one of accuracy"),
    ({"report": {"margin": -1.0}}, "report.margin: expected a number of points > 0"),
    ({"report": {"margin": 0.0}}, "report.margin: expected a number of points > 0"),
])
def test_bad_config_gives_one_line_error_naming_file_and_field(changes, message):
    with pytest.raises(ConfigError) as e:
        study(**changes)
    assert message in str(e.value)
    assert "/tmp/s.toml" in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_parse_toml_values_and_nested_keys(tmp_path):
    raw = apply_overrides(BASE, ["train.epochs=1", "seeds=[0, 1]", "datasets.d.max_train=50",
                                 "datasets.d.source=builtin:rotten_tomatoes"], cwd=tmp_path)
    s = validate_study(raw)
    assert s.train["epochs"] == 1 and s.seeds == [0, 1] and s.datasets["d"]["max_train"] == 50
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(BASE, ["train.epochs"])


def test_override_paths_are_relative_to_the_working_directory(tmp_path):
    (tmp_path / "data").mkdir()
    raw = apply_overrides(BASE, ["datasets.d.source=data"], cwd=tmp_path)
    assert raw["datasets"]["d"]["source"] == str((tmp_path / "data").resolve())


def test_study_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="study file not found"):
        read_study_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_study_file(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("name = 'caf\xe9'".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_study_file(latin)


def test_yaml_studies_are_accepted(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("models: [m]\narms:\n  - method: lora\n    r: [2, 4]\n")
    assert len(expand_runs(load_study(path))) == 2


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_study_validates(path):
    text = path.read_text()
    assert text.startswith("#"), "each shipped study starts with a header comment saying what it reproduces"
    s = load_study(path)
    assert expand_runs(s)

"""Run ids hash local paths relative to the study file, so a store moved with its data and study keeps every run; a
store written with the old ids (absolute paths) is noticed and migrated."""

import json
import shutil
from pathlib import Path

import pytest

from peftbench.cli import main
from peftbench.config import RunConfig, expand_runs, load_study
from peftbench.store import Store

ARMS = """
[[arms]]
method = "frozen"
lr = 1e-1

[[arms]]
method = "lora"
r = 2
lr = 3e-2

[[arms]]
method = "tfidf"
"""


@pytest.fixture
def project(tmp_path, tiny_bert, tiny_data) -> Path:
    """A folder with a study that names its model and data by paths relative to itself, and a store of its runs."""
    root = tmp_path / "project"
    shutil.copytree(tiny_bert, root / "models" / "tiny-bert")
    shutil.copytree(tiny_data, root / "data" / "tiny")
    (root / "studies").mkdir()
    (root / "studies" / "tiny.toml").write_text(f"""
name = "tiny"
models = ["../models/tiny-bert"]
[datasets.tiny]
source = "../data/tiny"
[train]
epochs = 1
batch_size = 16
max_length = 32
{ARMS}""")
    assert main(["run", str(root / "studies" / "tiny.toml"), "--store", str(root / "runs"), "--no-report"]) == 0
    return root


def validate(root: Path, capsys) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["validate", str(root / "studies" / "tiny.toml"), "--store", str(root / "runs")]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def run_again(root: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["run", str(root / "studies" / "tiny.toml"), "--store", str(root / "runs"), "--no-report"]) == 0
    return capsys.readouterr().out


def to_old_ids(store: Path) -> dict[str, str]:
    """Rewrite a store as peftbench wrote it before portable ids: no ``study_dir`` in the config, folders named by
    the hash of the absolute paths. Returns old id → new id."""
    mapping = {}
    for run_id in Store(store).run_ids():
        folder = store / run_id
        config = json.loads((folder / "config.json").read_text())
        config.pop("study_dir")
        old_id = RunConfig.from_dict(config).run_id
        result = json.loads((folder / "result.json").read_text())
        result.update(run_id=old_id, config=config)
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "result.json").write_text(json.dumps(result))
        folder.rename(store / old_id)
        mapping[old_id] = run_id
    return mapping


def test_hub_and_builtin_ids_are_unchanged_and_local_paths_are_hashed_relative_to_the_study(project):
    demo = expand_runs(load_study())  # builtin model and data: the run id hashes what it always did
    assert all(run.run_id == run.legacy_run_id for run in demo)
    runs = expand_runs(load_study(project / "studies" / "tiny.toml"))
    for run in runs:
        hashed = run.hashed
        assert hashed["model_rel"] == "../models/tiny-bert" and "model" not in hashed
        assert hashed["dataset"]["source_rel"] == "../data/tiny" and "source" not in hashed["dataset"]
        assert run.model == str(project / "models" / "tiny-bert")  # loading still uses the absolute path
    stored = json.loads((project / "runs" / runs[0].run_id / "config.json").read_text())
    assert RunConfig.from_dict(stored).run_id == runs[0].run_id


def test_moved_store_data_and_study_find_every_run_done(project, tmp_path, capsys):
    ids = set(Store(project / "runs").run_ids())
    assert len(ids) == 3
    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(project, moved)  # the old paths no longer exist
    out, err = validate(moved, capsys)
    assert "3 runs, 3 already in" in out and not err
    assert {r.run_id for r in expand_runs(load_study(moved / "studies" / "tiny.toml"))} == ids
    assert "(0 trained now, 3 already done)" in run_again(moved, capsys)


def test_old_store_is_noticed_and_migrated_in_place(project, capsys):
    mapping = to_old_ids(project / "runs")
    out, err = validate(project, capsys)
    assert "0 already in" in out
    assert "3 of this study's runs may be stored under run ids of an older peftbench" in err
    assert "peftbench migrate" in err and len(err.strip().splitlines()) == 1
    assert main(["migrate", str(project / "runs"), "--study", str(project / "studies" / "tiny.toml")]) == 0
    assert "3 runs renamed" in capsys.readouterr().out
    assert set(Store(project / "runs").run_ids()) == set(mapping.values())
    out, err = validate(project, capsys)
    assert "3 runs, 3 already in" in out and not err
    assert "(0 trained now, 3 already done)" in run_again(project, capsys)


def test_old_store_moved_with_its_data_is_recognised_by_content(project, tmp_path, capsys):
    mapping = to_old_ids(project / "runs")
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)  # old ids hash paths that no longer exist: only the content can tell
    study = str(moved / "studies" / "tiny.toml")
    assert main(["migrate", str(moved / "runs"), "--study", study, "--dry-run"]) == 0
    assert "3 runs to rename" in capsys.readouterr().out
    assert set(Store(moved / "runs").run_ids()) == set(mapping)  # a dry run renames nothing
    assert main(["migrate", str(moved / "runs"), "--study", study]) == 0
    assert set(Store(moved / "runs").run_ids()) == set(mapping.values())
    for run_id in mapping.values():
        result = json.loads((moved / "runs" / run_id / "result.json").read_text())
        assert result["run_id"] == run_id and result["config"]["study_dir"] == str((moved / "studies").resolve())
    assert "(0 trained now, 3 already done)" in run_again(moved, capsys)


def test_changed_data_is_not_taken_for_the_old_runs(project, tmp_path, capsys):
    to_old_ids(project / "runs")
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)
    test_csv = moved / "data" / "tiny" / "test.csv"
    test_csv.write_text(test_csv.read_text().replace("good", "fine"))  # other texts: another dataset fingerprint
    assert main(["migrate", str(moved / "runs"), "--study", str(moved / "studies" / "tiny.toml")]) == 0
    assert "0 runs renamed" in capsys.readouterr().out

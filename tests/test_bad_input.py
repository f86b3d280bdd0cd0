"""Bad input and hostile files: each case of docs/bad-input.md ends in one line on stderr naming the file and field,
exit 2, and a store left exactly as it was (checksum before and after). Plus the fixes that are not errors: the usual
validation file names, safe links in reports, safetensors-only loading, an atomic report, llm costs of failed runs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from peftbench.cli import main
from peftbench.store import Store
from tests.conftest import make_texts, write_study
from tests.test_report import write_run


def checksum(path: Path) -> str:
    """Every file and folder under ``path`` (or the file itself): names, contents and kinds."""
    h = hashlib.sha256()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*")) if path.exists() else []:
        h.update(str(p.relative_to(path)).encode() + (b"/" if p.is_dir() else b""))
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def one_line_error(capsys, argv: list[str], code: int = 2, started: bool = False) -> str:
    """Run the CLI in-process; check the exit code and that stderr is one line without a traceback. ``started``: the
    command got as far as its progress bars (also on stderr), so only its error lines are counted."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    if started:
        err = "\n".join(line for line in err.splitlines() if line.startswith("peftbench:") or "Traceback" in line)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def data_folder(folder: Path, train: pd.DataFrame | str, test: pd.DataFrame | None = None, **extra: str) -> Path:
    folder.mkdir(parents=True)
    for name, frame in {"train": train, "test": make_texts(20, 2) if test is None else test}.items():
        if isinstance(frame, str):
            (folder / f"{name}.csv").write_text(frame)
        else:
            frame.to_csv(folder / f"{name}.csv", index=False)
    for name, text in extra.items():
        (folder / name.replace("_", ".")).write_text(text)
    return folder


def pickle_model(tiny_bert: Path, folder: Path) -> Path:
    """The tiny model folder with its weights as a pickled pytorch_model.bin only."""
    from safetensors.torch import load_file

    shutil.copytree(tiny_bert, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch):
    """``folder`` made read-only. Root ignores file modes, so there writes under it are refused as a read-only mount
    would refuse them (os.open for writing, mkdir, rename, unlink)."""
    folder = folder.resolve()
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(os.fsdecode(path))).is_relative_to(folder)

    def refuse(fn, writes=lambda *a: True):
        def guarded(path, *args, **kwargs):
            if inside(path) and writes(*args):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return fn(path, *args, **kwargs)
        return guarded

    if os.geteuid() == 0:
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT
        monkeypatch.setattr(os, "open", refuse(os.open, lambda flags, *a: flags & writing))
        for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    try:
        yield
    finally:
        monkeypatch.undo()
        for p, mode in modes.items():
            p.chmod(mode)


# --------------------------------------------------------------------------------------------------------------------
# The battery: (case id, setup → argv, message that must appear, exit code)
# --------------------------------------------------------------------------------------------------------------------

LORA = '[[arms]]\nmethod = "lora"\nr = 2\n'


def _study(t, arms=LORA, extra="", data=None, model=None):
    return str(write_study(t.tmp / "study.toml", model or t.model, data or t.data, arms, extra))


def _run(t, study, *more):
    return ["run", study, "--store", str(t.store), "--no-report", *more]


CASES = {
    "epochs = 0": (lambda t: _run(t, _study(t), "--set", "train.epochs=0"),
                   "study.toml: train.epochs: expected an integer >= 1, got 0"),
    "header-only CSV": (lambda t: _run(t, _study(t, data=data_folder(t.tmp / "d", "text,label\n"))),
                        "d/train.csv: no data rows (dataset 'tiny', train split)"),
    "one class, no labels.txt": (
        lambda t: _run(t, _study(t, data=data_folder(t.tmp / "d", make_texts(40, 1).assign(label=1),
                                                     make_texts(10, 2).assign(label=1)))),
        "dataset 'tiny' (train): only one class ('1') in column 'label' (field label_column)"),
    "empty labels": (lambda t: _run(t, _study(t, data=data_folder(t.tmp / "d", "text,label\na good film,1\nbad,\n"))),
                     "empty or missing label in 1 rows"),
    "target_modules = [nosuch]": (
        lambda t: _run(t, _study(t, arms='[[arms]]\nmethod = "lora"\ntarget_modules = ["nosuch"]\n')),
        "study.toml: arm 'lora r=8'.target_modules: nosuch matches no linear layer of bert"),
    "ia3 feedforward not a target": (
        lambda t: _run(t, _study(t, arms='[[arms]]\nmethod = "ia3"\ntarget_modules = ["key"]\n'
                                      'feedforward_modules = ["value"]\n')),
        "feedforward_modules: value is not among target_modules"),
    "report.reference names no arm": (
        lambda t: _run(t, _study(t, extra='[report]\nreference = "nosuch"\n')),
        "study.toml: report.reference: 'nosuch' names no arm (expected an arm label or method: lora, lora r=2)"),
    "llm arm without model": (lambda t: _run(t, _study(t, arms='[[arms]]\nmethod = "llm"\n')),
                              "study.toml: arms[0].model: missing (expected the model name"),
    "pickle-only model folder": (lambda t: _run(t, _study(t, model=pickle_model(t.model, t.tmp / "pickled"))),
                                 "pickled/pytorch_model.bin: pickle weights are not loaded"),
    "store path is a file": (lambda t: _run(t, _study(t)), "store: the store path is a file, not a folder"),
    "read-only store (run)": (lambda t: _run(t, _study(t)), "is not writable (Permission denied)"),
    "read-only store (report)": (lambda t: ["report", str(t.store)], "Permission denied"),
    "report --out a folder that is no report": (
        lambda t: ["report", str(t.store), "--out", str(t.tmp)], "not a report folder (no report.md) and not empty"),
    "val.csv beside an unknown data file": (
        lambda t: _run(t, _study(t, data=data_folder(t.tmp / "d", make_texts(40, 1), val_csv="text,label\na,0\n",
                                                     extra_csv="text,label\nb,1\n"))),
        "d: data file extra.csv matches no split (files: extra.csv, test.csv, train.csv, val.csv"),
    "validation_split names a missing file": (
        lambda t: _run(t, _study(t), "--set", "datasets.tiny.validation_split=dev2"),
        "no dev2.csv/.tsv/.jsonl/.parquet file for validation_split = 'dev2' (data files: test.csv, train.csv)"),
    "YAML syntax error": (lambda t: ["validate", str(_yaml(t, "name: x\narms:\n  - method: lora\n   r: 2\n"))],
                          "study.yaml: invalid YAML at line 4, column 4"),
    "TOML syntax error": (lambda t: ["validate", str(_toml(t, "name = \"x\"\n[train\n"))],
                          "study.toml: invalid TOML: "),
    "train --r 0": (lambda t: ["train", "--model", str(t.model), "--dataset", str(t.data), "--r", "0",
                               "--store", str(t.store)], "--r: expected a rank >= 1, got 0"),
    "train --epochs 0": (lambda t: ["train", "--model", str(t.model), "--dataset", str(t.data), "--epochs", "0",
                                    "--store", str(t.store)], "--epochs: expected an integer >= 1, got 0"),
}


def _yaml(t, text):
    (t.tmp / "study.yaml").write_text(text)
    return t.tmp / "study.yaml"


def _toml(t, text):
    (t.tmp / "study.toml").write_text(text)
    return t.tmp / "study.toml"


class Setup:
    def __init__(self, tmp: Path, model: Path, data: Path, store: Path):
        self.tmp, self.model, self.data, self.store = tmp, model, data, store


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return data_folder(tmp_path_factory.mktemp("data") / "small", make_texts(40, 1))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_the_store_is_untouched(case, tmp_path, tiny_bert, small_data, capsys,
                                                                 monkeypatch):
    store = tmp_path / "store"
    if case == "store path is a file":
        store.write_text("not a folder\n")
    else:
        write_run(store, "lora r=2", "lora", 0, 1e-3, make_texts(10, 3).assign(
            id=range(10), pred=1, probs=[[0.2, 0.8]] * 10, length=5), r=2)
        (store / "keep.txt").write_text("x")
    make_argv, message = CASES[case]
    argv = make_argv(Setup(tmp_path, tiny_bert, small_data, store))
    before = checksum(store)
    with read_only(store, monkeypatch) if case.startswith("read-only") else contextlib.nullcontext():
        err = one_line_error(capsys, argv)
    assert message in err, err
    assert checksum(store) == before
    assert not list(tmp_path.glob(".store.*")) and not list(tmp_path.glob(".*report*"))


def test_usual_validation_file_names_are_used_and_validate_says_where_each_split_comes_from(
        tmp_path, tiny_bert, capsys):
    data = data_folder(tmp_path / "d", make_texts(60, 1), val_csv=make_texts(16, 3).to_csv(index=False))
    study = write_study(tmp_path / "s.toml", tiny_bert, data, LORA)
    assert main(["validate", str(study), "--store", str(tmp_path / "st")]) == 0
    assert "dataset tiny: train 60 (train.csv), validation 16 (val.csv), test 20 (test.csv)" in capsys.readouterr().out
    (data / "val.csv").rename(data / "dev.csv")
    from peftbench import runner

    runner._cached_splits.cache_clear()  # the same spec, other files
    assert main(["validate", str(study), "--store", str(tmp_path / "st")]) == 0
    assert "validation 16 (dev.csv)" in capsys.readouterr().out
    (data / "dev.csv").unlink()
    runner._cached_splits.cache_clear()
    assert main(["validate", str(study), "--store", str(tmp_path / "st")]) == 0
    assert "train 54 (train.csv), validation 6 (carved from train, 10%)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# Hostile files that are not study errors
# --------------------------------------------------------------------------------------------------------------------


def test_study_text_never_becomes_a_live_link_in_reports(tmp_path):
    from peftbench.config import validate_study
    from peftbench.report import write_report

    evil = "[x](javascript:alert(1)) <img src=x onerror=alert(1)> [y](java&#115;cript:z) <javascript:alert(2)>"
    store = tmp_path / "store"
    frame = make_texts(20, 3).assign(id=range(20), pred=1, probs=[[0.2, 0.8]] * 20, length=5)
    write_run(store, "full", "full", 0, 1e-3, frame)
    write_run(store, evil, "lora", 0, 1e-3, frame, r=2)
    study = validate_study({"name": "s", "description": evil, "arms": [{"method": "full"}]})
    out = write_report(store, study=study)
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert "javascript" in page and "<a href=\"javascript" not in page and "<img src=x" not in page
    assert 'href="java&amp;#115;cript' not in page
    # Markdown: every "](" that is not the report's own file link, and every "<" that could open a tag, is escaped
    assert re.search(r"(?<!\\)\]\((?!(results|runs|per_class|table|report|plots/)[\w./-]*\))", md) is None
    assert re.search(r"(?<!\\)<[A-Za-z/!?]", md) is None and "\\<img src=x" in md
    # the report's own links stay (in the HTML, as the file embedded: the page can be shared alone)
    assert "[results.csv](results.csv)" in md and '<a download="results.csv" href="data:' in page


def test_pickled_adapter_is_refused_by_evaluate_export_and_predict(tmp_path, tiny_bert, small_data, capsys):
    from safetensors.torch import load_file

    store = tmp_path / "store"
    assert main(["train", "--model", str(tiny_bert), "--dataset", str(small_data), "--method", "lora", "--r", "2",
                 "--epochs", "1", "--store", str(store), "--no-report"]) == 0
    (run_id,) = Store(store).run_ids()
    adapter = store / run_id / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    capsys.readouterr()
    before = checksum(store)
    (tmp_path / "in.csv").write_text("text\na good film\n")
    for argv in (["evaluate", str(store / run_id)], ["export", str(store / run_id), str(tmp_path / "out")],
                 ["predict", str(store / run_id), "--input", str(tmp_path / "in.csv"), "--output",
                  str(tmp_path / "p.csv")]):
        assert "adapter/adapter_model.bin: pickle weights are not loaded" in one_line_error(capsys, argv)
    assert checksum(store) == before and not (tmp_path / "out").exists() and not (tmp_path / "p.csv").exists()


def test_token_cache_never_unpickles_objects(tmp_path):
    from peftbench.data import tokenize

    class Tok:  # the minimum tokenize needs
        backend_tokenizer = None

        def get_vocab(self):
            return {"a": 0}

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[1, 2]] * len(texts)}

    assert tokenize(["x"], Tok(), 8, tmp_path) == [[1, 2]]
    (cached,) = tmp_path.glob("*.pt")
    torch.save({"payload": pd.Timestamp("2020-01-01")}, cached)  # an object, not plain ids: refused, re-tokenized
    assert tokenize(["x"], Tok(), 8, tmp_path) == [[1, 2]]


# --------------------------------------------------------------------------------------------------------------------
# Faults while writing: a full disk mid-run and mid-report
# --------------------------------------------------------------------------------------------------------------------


def _enospc_on(name: str, monkeypatch):
    """write_json raises ENOSPC when it writes a file called ``name`` (everywhere write_json was imported)."""
    from peftbench import store as store_module

    real = store_module.write_json

    def failing(path, obj):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj)

    for module in ("peftbench.store", "peftbench.report"):
        monkeypatch.setattr(f"{module}.write_json", failing)


def test_disk_full_mid_run_leaves_no_half_written_run(tmp_path, tiny_bert, small_data, capsys, monkeypatch):
    study = write_study(tmp_path / "s.toml", tiny_bert, small_data, '[[arms]]\nmethod = "untrained"\n')
    store = tmp_path / "store"
    _enospc_on("result.json", monkeypatch)
    err = one_line_error(capsys, ["run", str(study), "--store", str(store), "--no-report"], code=1, started=True)
    assert "result.json: No space left on device" in err
    assert Store(store).run_ids() == [] and not any((store / ".tmp").iterdir())
    assert not any((store / ".claims").iterdir())
    monkeypatch.undo()
    assert main(["run", str(study), "--store", str(store), "--no-report"]) == 0  # and the run is simply redone
    assert len(Store(store).run_ids()) == 1


def test_report_is_swapped_in_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    from peftbench import report as report_module

    store = tmp_path / "store"
    frame = make_texts(20, 3).assign(id=range(20), pred=1, probs=[[0.2, 0.8]] * 20, length=5)
    write_run(store, "full", "full", 0, 1e-3, frame)
    assert main(["report", str(store)]) == 0
    before = checksum(store / "report")
    write_run(store, "lora r=2", "lora", 0, 1e-3, frame, r=2)
    _enospc_on("results.json", monkeypatch)  # the last file of the report
    err = one_line_error(capsys, ["report", str(store)], code=1)
    assert "results.json: No space left on device" in err
    monkeypatch.undo()
    assert checksum(store / "report") == before and sorted(p.name for p in store.iterdir() if p.name.startswith(
        ".")) == []

    def killed(*args):  # Ctrl-C in the middle of writing: the old report stays whole
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module.render, "html_page", killed)
    assert main(["report", str(store)]) == 130
    monkeypatch.undo()
    assert checksum(store / "report") == before and not [p for p in store.iterdir() if p.name.startswith(".")]
    assert main(["report", str(store)]) == 0
    md = (store / "report" / "report.md").read_text()
    shown = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert shown and all((store / "report" / p).is_file() for p in shown)  # every plot the report shows exists
    assert checksum(store / "report") != before


# --------------------------------------------------------------------------------------------------------------------
# llm arm: costs of a failed run, invalid predictions in the report
# --------------------------------------------------------------------------------------------------------------------


def test_failed_llm_run_records_what_it_spent(tmp_path, tiny_bert, small_data, monkeypatch):
    from tests.test_baselines import FakeChat, serving

    class FailsAfterOne(FakeChat):
        def handle(self, handler):
            if len(self.bodies) >= 1:  # the first batch is answered, every later request fails
                handler.rfile.read(int(handler.headers["Content-Length"]))
                return self.reply(handler, 500, {"error": "down"})
            return super().handle(handler)

    with serving(FailsAfterOne()) as url:
        arms = (f'[[arms]]\nmethod = "llm"\nmodel = "fake"\nbase_url = "{url}"\nbatch_size = 4\nmax_concurrency = 1\n'
                'max_retries = 0\nmax_test = 12\nprice_per_1k_input = 1.0\n')
        study = write_study(tmp_path / "s.toml", tiny_bert, small_data, arms)
        assert main(["run", str(study), "--store", str(tmp_path / "st"), "--no-report"]) == 1
    (run_id,) = Store(tmp_path / "st").run_ids()
    result = json.loads((tmp_path / "st" / run_id / "result.json").read_text())
    assert result["status"] == "failed" and "HTTP 500" in result["error"]
    assert result["costs"]["new_prompt_tokens"] == 40 and result["costs"]["spent_cost_usd"] == pytest.approx(0.04)


def test_report_shows_invalid_llm_predictions():
    from peftbench.report.document import arm_display
    from peftbench.report.tables import arm_table, ensure_columns

    runs = ensure_columns(pd.DataFrame([
        {"run_id": "a", "status": "success", "arm": "llm", "model": "m", "dataset": "d", "method": "llm", "seed": 0,
         "setting": "-", "test_accuracy": 0.0, "invalid": 12},
        {"run_id": "b", "status": "success", "arm": "full", "model": "m", "dataset": "d", "method": "full", "seed": 0,
         "setting": "-", "test_accuracy": 0.9}]))
    shown = arm_display(arm_table(runs)).set_index("Arm")["Invalid predictions"]
    assert shown["llm"] == "12" and shown["full"] == "n/a"

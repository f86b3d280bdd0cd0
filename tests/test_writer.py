"""The store is the only writer of run folders, and folders are replaced whole (docs/design.md, "Who writes what").

- Statically (``ast``, like tests/test_imports.py): every call that writes a file anywhere in the package outside
  ``peftbench/store.py`` is listed in ``OTHER_WRITERS`` with the folder it writes, none of which is a run folder; and
  the weights, the one thing a run's method saves with its own library, go to ``RunWriter.weights_dir``.
- Dynamically: a real study (trained, untrained and baseline arms, and an llm arm whose server is down) with the writer watched: nothing changes a
  run's folder between two calls of its writer, and nothing changes it after its commit.
- The report: a report killed mid-write (an exception in a plot function, in a renderer, or ``kill -9`` between the
  two renames of the fallback swap) leaves the previous report whole.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench import methods, runner, store as store_module
from peftbench.cli import main
from peftbench.store import RunWriter, Store
from tests.conftest import make_texts, write_study
from tests.test_bad_input import checksum
from tests.test_imports import MODULES
from tests.test_report import write_run

# --------------------------------------------------------------------------------------------------------------------
# Static: who writes files
# --------------------------------------------------------------------------------------------------------------------

WRITE_ATTRS = {"write_text", "write_bytes", "touch", "mkdir", "to_parquet", "to_csv", "save_pretrained", "savefig",
               "unlink", "rmdir", "symlink_to", "save", "write_json", "save_file"}
WRITE_FUNCTIONS = {("json", "dump"), ("torch", "save"), ("pickle", "dump"), ("os", "open"), ("os", "replace"),
                   ("os", "rename"), ("os", "remove"), ("os", "unlink"), ("os", "makedirs"), ("os", "mkdir"),
                   ("os", "utime")}

# Every function outside peftbench/store.py that writes files, and what it writes: none of them is a run folder.
OTHER_WRITERS = {
    ("peftbench.data", "encode"): "the token cache, STORE/.cache/tokens/",
    ("peftbench.llm", "_write_cache"): "the LLM response cache, STORE/.cache/",
    ("peftbench.runner", "_shared_features"): "the frozen-encoder output cache, STORE/.cache/features/",
    ("peftbench.export", "export_run"): "an exported model folder (peftbench export --out, refused if not empty)",
    ("peftbench.export", "write_table"): "the output file of peftbench predict",
    ("peftbench.report", "write_report"): "the report folder: removes its own half-built copy",
    ("peftbench.report", "_write_files"): "the report folder being built (store.fresh_sibling)",
    ("peftbench.report.plots", "png"): "a figure into an in-memory buffer",
    ("peftbench.methods.base", "Method.save_weights"): "a run's weights, into RunWriter.weights_dir (see the test "
                                                      "below)",
    ("peftbench.methods.peft_methods", "PeftMethod.save_weights"): "a peft adapter, into RunWriter.weights_dir",
    ("peftbench.report.compare", "write_comparison"): "the comparison folder being built (store.fresh_sibling)",
    ("peftbench.search", "run_search"): "the search's Optuna journals and record, STORE/.search/<study>/",
    ("peftbench.trackers", "MlflowTracker.__init__"): "the MLflow tracking folder, STORE/.mlflow/",
    ("peftbench.trackers", "WandbTracker.__init__"): "the W&B offline folder, STORE/.wandb/",
}


def _modes(call: ast.Call) -> list[str]:
    modes = [a.value for a in call.args[1:2] if isinstance(a, ast.Constant)]
    modes += [k.value.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
    return [str(m) for m in modes]


def _is_write(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Name):
        if f.id == "open":
            return any(c in m for m in _modes(call) for c in "wax+")
        return f.id in ("write_json", "save_file", "save_torch")
    if not isinstance(f, ast.Attribute):
        return False
    base = f.value.id if isinstance(f.value, ast.Name) else None
    if (base, f.attr) in WRITE_FUNCTIONS or base == "shutil" or f.attr in WRITE_ATTRS:
        return True
    return f.attr == "to_json" and bool(call.args or any(k.arg == "path_or_buf" for k in call.keywords))


def file_writes(source: str) -> list[tuple[str, int]]:
    """(enclosing function, line) of every call in ``source`` that writes, moves or removes a file or folder."""
    out = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{where}.{child.name}" if where else child.name
            if isinstance(child, ast.Call) and _is_write(child):
                out.append((inner or "<module>", child.lineno))
            visit(child, inner)

    visit(ast.parse(source), "")
    return out


def test_the_scanner_sees_writes():
    source = '''
def f(p, frame):
    open(p, "a").write("x")
    open(p).read()
    (p / "x").write_text("y")
    frame.to_parquet(p)
    frame.to_json()
    os.replace(p, p)
    shutil.rmtree(p)
class C:
    def g(self, model):
        model.save_pretrained(self.dir)
'''
    assert file_writes(source) == [("f", 3), ("f", 5), ("f", 6), ("f", 8), ("f", 9), ("C.g", 12)]


def test_no_module_but_the_store_writes_run_folders():
    found = {(name, where) for name, path in MODULES.items() if name != "peftbench.store"
             for where, _ in file_writes(path.read_text())}
    new = sorted(found - set(OTHER_WRITERS))
    assert not new, ("files written outside peftbench/store.py in " + ", ".join(f"{m}.{f}" for m, f in new)
                     + ": a run folder is written only through store.RunWriter; a writer of something else goes "
                     "into OTHER_WRITERS with what it writes")
    assert not set(OTHER_WRITERS) - found, f"no longer writing: {sorted(set(OTHER_WRITERS) - found)}"


def test_weights_are_saved_only_into_the_writers_weights_dir():
    calls = [(name, node) for name, path in MODULES.items() if not name.startswith("peftbench.methods")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
             == "save_weights"]
    assert calls, "save_weights is called somewhere"
    for name, call in calls:  # (the methods package passes the folder on to the method's own class)
        args = [*call.args, *(k.value for k in call.keywords)]
        assert any(isinstance(a, ast.Attribute) and a.attr == "weights_dir" for a in args), (
            f"{name}:{call.lineno}: save_weights must write into a RunWriter's weights_dir: {ast.unparse(call)}")


# --------------------------------------------------------------------------------------------------------------------
# Dynamic: a real study, its writers watched
# --------------------------------------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


@pytest.fixture
def watched(monkeypatch):
    """Wraps every writing method of RunWriter, and methods.save_weights: each notes the folder's files when it
    leaves, and each one entered first checks that nothing changed them since. Committed folders are noted too.
    Returns (problems, committed folders)."""
    seen: dict[Path, dict] = {}
    problems: list[str] = []
    committed: dict[Path, dict] = {}

    def check(folder: Path, what: str) -> None:
        now = _files(folder)
        if folder in seen and now != seen[folder]:
            changed = sorted(set(now.items()) ^ set(seen[folder].items()))
            problems.append(f"{folder.name}: changed outside the writer before {what}: {changed}")

    def watch(cls_or_module, name: str, folder_of) -> None:
        real = getattr(cls_or_module, name)

        def wrapper(*args, **kwargs):
            folder = folder_of(*args, **kwargs)
            check(folder, name)
            out = real(*args, **kwargs)
            seen[folder] = _files(folder)
            if name == "commit":
                committed[Path(out)] = _files(Path(out))
            return out

        monkeypatch.setattr(cls_or_module, name, wrapper)

    real_init = RunWriter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen[self.dir] = _files(self.dir)

    monkeypatch.setattr(RunWriter, "__init__", init)
    for name in ("append_epoch", "write_predictions", "write_spectrum", "commit"):
        watch(RunWriter, name, lambda self, *a, **k: self.dir)

    def weights_folder(method, model, out_dir, **kwargs):
        if Path(out_dir) not in seen:
            problems.append(f"save_weights into {out_dir}, not a RunWriter's folder")
        return Path(out_dir)

    watch(methods, "save_weights", weights_folder)
    return problems, committed


ARMS = """
[[arms]]
method = "untrained"

[[arms]]
method = "lora"
r = 2
lr = 1e-2

[[arms]]
method = "full"
lr = 1e-3

[[arms]]
method = "tfidf"

[[arms]]
name = "broken"
method = "llm"
model = "none"
base_url = "http://127.0.0.1:9/v1"
max_retries = 0
"""


def _run(tmp_path, model, data, arms=ARMS, code=1) -> Path:
    study = write_study(tmp_path / "s.toml", model, data, arms)
    assert main(["run", str(study), "--store", str(tmp_path / "store"), "--no-report", "--set", "train.epochs=2",
                 "--set", "train.bf16=false"]) == code
    return tmp_path / "store"


def test_every_file_of_a_run_folder_is_written_by_its_writer(tmp_path, tiny_minilm_like, tiny_data, watched):
    problems, committed = watched
    store = _run(tmp_path, tiny_minilm_like, tiny_data)
    statuses = {r["config"]["method"]: r["status"] for r in Store(store).results()}
    assert statuses == {"untrained": "success", "lora": "success", "full": "success", "tfidf": "success",
                        "llm": "failed"}
    assert not problems, problems
    assert set(committed) == {store / i for i in Store(store).run_ids()}
    for folder, files in committed.items():  # and nothing wrote into a run folder after its commit
        assert _files(folder) == files, folder
    names = {folder.name: set(files) for folder, files in committed.items()}
    by_method = {r["config"]["method"]: names[r["run_id"]] for r in Store(store).results()}
    assert by_method["llm"] == {"config.json", "result.json"}
    assert by_method["tfidf"] == by_method["untrained"] - {"model.safetensors"} == {
        "config.json", "result.json", "metrics.jsonl", "predictions.parquet"}
    assert {"model.safetensors", "spectrum.json", "metrics.jsonl"} <= by_method["full"]
    assert {"adapter/adapter_config.json", "spectrum.json"} <= by_method["lora"]


def test_the_watch_catches_a_stray_write(tmp_path, tiny_minilm_like, tiny_data, watched, monkeypatch):
    problems, _ = watched
    real = runner._write_spectrum

    def stray(writer, model, pretrained):
        (writer.dir / "notes.txt").write_text("written behind the writer's back")
        return real(writer, model, pretrained)

    monkeypatch.setattr(runner, "_write_spectrum", stray)
    _run(tmp_path, tiny_minilm_like, tiny_data, '[[arms]]\nmethod = "lora"\nr = 2\nlr = 1e-2\n', code=0)
    assert len(problems) == 1 and "notes.txt" in problems[0] and "write_spectrum" in problems[0]


# --------------------------------------------------------------------------------------------------------------------
# The writer on its own
# --------------------------------------------------------------------------------------------------------------------


def test_a_failed_run_and_a_discarded_one(tmp_path):
    store = Store(tmp_path)
    result = store.writer("a" * 16, {"seed": 0}).fail("RuntimeError: lost", timing={"finished": "now"})
    assert result == {"run_id": "a" * 16, "status": "failed", "error": "RuntimeError: lost", "config": {"seed": 0},
                      "timing": {"finished": "now"}}
    assert store.status("a" * 16) == "failed" and set(_files(store.run_dir("a" * 16))) == {"config.json",
                                                                                           "result.json"}
    writer = store.writer("b" * 16, {})
    writer.append_epoch({"epoch": 1})
    writer.discard()
    assert not writer.dir.exists() and store.run_ids() == ["a" * 16]
    with pytest.raises(ValueError, match=r"predictions.parquet: columns \['length'"):
        store.writer("c" * 16, {}).write_predictions(make_texts(2, 0).assign(id=0, pred=0, probs=[[1.0]] * 2))


def test_a_commit_that_fails_leaves_no_folder(tmp_path, monkeypatch):
    store = Store(tmp_path)
    writer = store.writer("a" * 16, {})
    real = store_module.write_json

    def full(path, obj, indent=2):
        if Path(path).name == "result.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj, indent)

    monkeypatch.setattr(store_module, "write_json", full)
    with pytest.raises(OSError, match="No space left"):
        writer.commit({"status": "success"})
    assert not writer.dir.exists() and not store.run_dir("a" * 16).exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames"])
def test_a_failed_run_is_replaced_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(store_module, "_exchange", lambda a, b: False)
    store = Store(tmp_path)
    store.writer("a" * 16, {}).fail("first")
    writer = store.writer("a" * 16, {})
    writer.write_spectrum({"rows": []})
    writer.commit({"status": "success"})
    assert store.status("a" * 16) == "success"
    assert set(_files(store.run_dir("a" * 16))) == {"config.json", "result.json", "metrics.jsonl", "spectrum.json"}
    assert not any((tmp_path / ".tmp").iterdir())


def test_exchange_swaps_two_folders_where_the_system_can(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not store_module._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or filesystem")
    assert not (tmp_path / "a" / "x").exists() and (tmp_path / "b" / "x").read_text() == "a"


# --------------------------------------------------------------------------------------------------------------------
# The report: swapped in whole, or not at all
# --------------------------------------------------------------------------------------------------------------------


def _report_store(tmp_path) -> Path:
    store = tmp_path / "store"
    frame = make_texts(20, 3).assign(id=range(20), pred=1, probs=[[0.2, 0.8]] * 20, length=5)
    write_run(store, "full", "full", 0, 1e-3, frame)
    assert main(["report", str(store)]) == 0
    write_run(store, "lora r=2", "lora", 0, 1e-3, frame, r=2)  # the next report differs
    return store


def _leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name.startswith(".report"))


@pytest.mark.parametrize("where", ["plots.training_curves", "render.markdown"])
def test_a_report_failing_mid_write_leaves_the_previous_one_whole(tmp_path, monkeypatch, where):
    from peftbench import report

    store = _report_store(tmp_path)
    before = checksum(store / "report")
    module, name = where.split(".")

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(getattr(report, module), name, broken)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        report.write_report(store)
    assert checksum(store / "report") == before and _leftovers(store) == []
    monkeypatch.undo()
    report.write_report(store)
    assert checksum(store / "report") != before and _leftovers(store) == []


KILLED_BETWEEN_RENAMES = """
import os, sys
from peftbench import report, store
store._exchange = lambda a, b: False   # the two-rename fallback
real = os.replace
def replace(src, dst):
    if os.path.basename(str(src)).startswith(".report.new-"):
        os._exit(9)                     # kill -9 after the old report moved aside, before the new one moved in
    return real(src, dst)
os.replace = replace
report.write_report(sys.argv[1])
"""


def test_a_report_killed_between_the_two_renames_gets_its_old_report_back(tmp_path):
    store = _report_store(tmp_path)
    before = checksum(store / "report")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(store)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not (store / "report").exists()  # the window of the fallback: the old report whole beside it
    (old,) = [store / n for n in _leftovers(store) if n.startswith(".report.old-")]
    assert checksum(old) == before
    store_module.fresh_sibling(store / "report")  # what the next report writer does first
    assert checksum(store / "report") == before
    from peftbench.report import write_report

    write_report(store)
    assert checksum(store / "report") != before and _leftovers(store) == []

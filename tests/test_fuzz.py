"""Fuzzing the front door: mutated study files (TOML and YAML) and mutated data files through ``peftbench validate``.

For every case: no Python traceback, exit 0 or 2, at most one line on stderr for exit 2, and the store's checksum
unchanged. ``validate`` runs in-process (peftbench.cli.main) for speed; study fuzz uses ``--no-data`` except where
the data matters, data fuzz always loads the data.

Profiles: ``ci`` (the default: a few hundred cases, seconds) and ``long`` (thousands; ``PEFTBENCH_FUZZ=long pytest
tests/test_fuzz.py``). docs/bad-input.md records what the long profile found.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftbench.cli import main
from tests.conftest import make_texts
from tests.test_bad_input import checksum

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=2500, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROFILE = "long" if os.environ.get("PEFTBENCH_FUZZ") == "long" else "ci"

BASE = {
    "name": "fuzz", "description": "a study", "seeds": [0, 1], "models": ["MODEL"],
    "datasets": {"tiny": {"source": "DATA", "max_train": 30, "validation_fraction": 0.2}},
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "max_length": 32, "lr_scheduler": "linear"},
    "arms": [{"method": "lora", "r": [2, 4], "lora_alpha": "2r"}, {"method": "full", "lr": [1e-4, 3e-4]},
             {"method": "tfidf", "C": 1.0}],
    "report": {"reference": "full", "margin": 1.0},
}

ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
                st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                st.sampled_from(["", "auto", "nosuch", "2r", "../x", "builtin:nothing", "0", "[]", "lora", "full",
                                 "\x00", "é" * 3, "a" * 300]),
                st.lists(st.integers(-2, 5), max_size=3), st.lists(st.text(max_size=4), max_size=3),
                st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(node, prefix=()):
    """Every (path, value) in a nested dict/list."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_study(draw):
    """The base study with a few mutations: drop, rename, retype or re-nest a key, or set an odd value."""
    study = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(study) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = study
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        action = draw(st.sampled_from(["drop", "rename", "odd", "nest", "listify"]))
        if action == "drop":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = parent.pop(key)
        elif action == "odd":
            parent[key] = draw(ODD)
        elif action == "nest":
            parent[key] = {"value": parent[key]}
        elif action == "listify":
            parent[key] = [parent[key], parent[key]]
    return study


def _dump(study: dict, fmt: str) -> str | None:
    """The study as TOML or YAML text; None when TOML cannot express it (None values, odd keys)."""
    if fmt == "yaml":
        return yaml.safe_dump(study, allow_unicode=True)
    try:
        text = _toml(study)
        tomllib.loads(text)
        return text
    except (TypeError, ValueError, tomllib.TOMLDecodeError):
        return None


def _toml(study: dict) -> str:
    """A small TOML writer (top-level scalars, tables of scalars, arrays of tables); TypeError where it cannot."""

    def value(v):
        if v is None:
            raise TypeError("TOML has no null")
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(float(v)), repr(v)) if isinstance(
                v, float) else str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines, tables = [], []
    for k, v in study.items():
        if isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) and v:
            for name, table in v.items():
                tables.append(f"[{json.dumps(str(k))}.{json.dumps(str(name))}]")
                tables += [f"{json.dumps(str(a))} = {value(b)}" for a, b in table.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for table in v:
                tables.append(f"[[{json.dumps(str(k))}]]")
                tables += [f"{json.dumps(str(a))} = {value(b)}" for a, b in table.items()]
        else:
            lines.append(f"{json.dumps(str(k))} = {value(v)}")
    return "\n".join(lines + tables) + "\n"


def validate(argv: list[str]) -> tuple[int, str]:
    """``peftbench validate`` in-process: (exit code, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def check(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("fuzz") / "store"
    store.mkdir()
    (store / "keep.txt").write_text("x")
    return store


@pytest.fixture(scope="module")
def fuzz_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzzdata") / "tiny"
    folder.mkdir()
    make_texts(60, 1).to_csv(folder / "train.csv", index=False)
    make_texts(20, 2).to_csv(folder / "test.csv", index=False)
    return folder


@settings(settings.get_profile(PROFILE))
@given(study=mutated_study(), fmt=st.sampled_from(["toml", "yaml"]))
def test_fuzz_study_files(study, fmt, tmp_path_factory, tiny_bert, fuzz_data, fuzz_store):
    text = _dump(study, fmt)
    if text is None:  # TOML cannot say it: the same mutation as YAML
        text, fmt = _dump(study, "yaml"), "yaml"
    path = tmp_path_factory.mktemp("s") / f"study.{fmt}"
    text = text.replace("MODEL", str(tiny_bert)).replace("DATA", str(fuzz_data))
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    before = checksum(fuzz_store)
    check(*validate(["validate", str(path), "--no-data", "--store", str(fuzz_store)]))
    assert checksum(fuzz_store) == before


@st.composite
def mutated_data(draw):
    """A small train.csv / test.csv pair, then one corruption of one file."""
    train = make_texts(draw(st.integers(0, 12)), 1)
    test = make_texts(draw(st.integers(0, 6)), 2)
    fmt = draw(st.sampled_from(["csv", "tsv", "jsonl", "parquet", "csv.gz"]))
    action = draw(st.sampled_from(["none", "truncate", "latin1", "missing", "extra_column", "huge", "empty_field",
                                   "labels", "bytes", "rename_column", "labels_txt"]))
    target = draw(st.sampled_from(["train", "test"]))
    return train, test, fmt, action, target, draw(st.integers(0, 10**6)), draw(ODD)


def _write(frame, path: Path, fmt: str) -> None:
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "csv.gz":
        frame.to_csv(path, index=False, compression="gzip")


@settings(settings.get_profile(PROFILE))
@given(case=mutated_data())
def test_fuzz_data_files(case, tmp_path_factory, tiny_bert, fuzz_store):
    train, test, fmt, action, target, number, odd = case
    folder = tmp_path_factory.mktemp("d")
    frames = {"train": train, "test": test.astype(object)} if target == "test" else {"train": train.astype(object),
                                                                                      "test": test}
    frame = frames[target]
    if action == "missing" and len(frame):
        frame.loc[number % len(frame), "text" if number % 2 else "label"] = None
    elif action == "extra_column":
        frames[target] = frame.assign(extra=odd if not isinstance(odd, (list, dict)) else str(odd))
    elif action == "huge" and len(frame):
        frame.loc[number % len(frame), "text"] = "good " * 100_000
    elif action == "empty_field" and len(frame):
        frame.loc[number % len(frame), "label" if number % 2 else "text"] = ""
    elif action == "labels" and len(frame):
        frames[target] = frame.assign(label=[odd if not isinstance(odd, (list, dict)) else str(odd)] * len(frame))
    elif action == "rename_column":
        frames[target] = frame.rename(columns={"text": str(odd)})
    for role, f in frames.items():
        try:
            _write(f, folder / f"{role}.{fmt}", fmt)
        except Exception:  # noqa: BLE001 - a frame the writer itself refuses (e.g. parquet of mixed types)
            _write(f.astype(str), folder / f"{role}.{fmt}", fmt)
    path = folder / f"{target}.{fmt}"
    raw = path.read_bytes()
    if action == "truncate":
        path.write_bytes(raw[: number % (len(raw) + 1)])
    elif action == "latin1":
        path.write_bytes(raw.replace(b"good", "g\xf6\xf6d".encode("latin-1")))
    elif action == "bytes":
        path.write_bytes(raw[: number % (len(raw) + 1)] + bytes([number % 256]) * 3 + raw[number % (len(raw) + 1):])
    elif action == "labels_txt":
        (folder / "labels.txt").write_bytes(str(odd).encode("utf-8", "surrogatepass") if isinstance(odd, str)
                                            else b"\xff\xfe" + bytes(number % 256 for _ in range(3)))
    study = folder / "study.toml"
    study.write_text(f'models = [{json.dumps(str(tiny_bert))}]\narms = [{{method = "lora", r = 2}}]\n'
                     f'[datasets.d]\nsource = {json.dumps(str(folder))}\n')
    before = checksum(fuzz_store)
    check(*validate(["validate", str(study), "--store", str(fuzz_store)]))
    assert checksum(fuzz_store) == before

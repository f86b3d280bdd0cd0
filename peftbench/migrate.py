"""Stores written before portable run ids: find their runs and rename them to the ids they have now.

Run ids once hashed local model folders and dataset paths as the absolute paths they had, so moving a data folder or a
store changed every id. They now hash those paths relative to the study file's folder (``RunConfig.identity``). A run
stored the old way is recognised, for a study, in one of two ways:

- by its old id (``RunConfig.legacy_run_id``: the study's config hashed with today's absolute paths), when nothing
  moved since it was trained;
- after a move, by its config equal to a study run's in everything but the local paths, *and* the same content: the
  dataset fingerprint (texts, labels and splits) and model fingerprint stored in its ``result.json`` equal those of the
  study's data and model now.

``peftbench validate`` and ``peftbench run`` print one line when a study's runs are missing but old-scheme runs that may
be theirs are stored; ``peftbench migrate STORE --study STUDY`` renames them (run it while no runner uses the store).

Example::

    >>> from peftbench.config import load_study
    >>> from peftbench.migrate import migrate
    >>> renamed = migrate(load_study("studies/demo.toml"), Store("runs"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import Any

from peftbench.config import ConfigError, RunConfig, Study, expand_runs, is_local_path
from peftbench.store import Store, read_result


def _legacy(store: Store) -> dict[str, RunConfig]:
    """Stored runs written before portable ids (no ``study_dir`` in their config: only those lack it), or stored under
    an id that is not their config's (a migration killed half-way)."""
    out = {}
    for run_id in store.run_ids():
        try:
            config = json.loads((store.run_dir(run_id) / "config.json").read_text())
            run = RunConfig.from_dict(config)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if "study_dir" not in config or run.run_id != run_id:
            out[run_id] = run
    return out


def _path_free(run: RunConfig) -> str:
    return json.dumps(run.identity("dropped"), sort_keys=True)


def candidates(runs: list[RunConfig], store: Store) -> dict[str, list[str]]:
    """For each run of ``runs`` not stored under its id: the old-scheme runs of ``store`` that may be it (its old id
    first, then runs equal to it but for local paths). Reads config files only; :func:`migrate` checks the content."""
    missing = [run for run in runs if store.status(run.run_id) is None]
    if not missing:
        return {}
    legacy = _legacy(store)
    by_config: dict[str, list[str]] = {}
    for run_id, run in legacy.items():
        by_config.setdefault(_path_free(run), []).append(run_id)
    out = {}
    for run in missing:
        found = [run.legacy_run_id] if run.legacy_run_id in legacy else []
        found += [i for i in by_config.get(_path_free(run), []) if i not in found]
        if found:
            out[run.run_id] = found
    return out


def notice(study: Study, store: Store) -> str | None:
    """One line when some of ``study``'s runs are missing from ``store`` but may be stored under old-scheme ids."""
    found = candidates(expand_runs(study), store) if study.path else {}  # a study without a file keeps its ids
    if not found:
        return None
    return (f"{store.root}: {len(found)} of this study's runs may be stored under run ids of an older peftbench "
            f"(absolute paths); 'peftbench migrate {store.root} --study {study.path}' renames them")


def same_content(run: RunConfig, result: dict[str, Any]) -> bool:
    """The stored run saw the data and model ``run`` names now: equal dataset and (local) model fingerprints."""
    from peftbench.models import model_fingerprint
    from peftbench.runner import get_splits

    env = result.get("environment") or {}
    if is_local_path(run.dataset["source"]):
        if not env.get("dataset_fingerprint") or env["dataset_fingerprint"] != get_splits(run.dataset).fingerprint:
            return False
    if is_local_path(run.model) and "model_fingerprint" in env and env["model_fingerprint"] != model_fingerprint(
            run.model):  # baselines use no model and record none
        return False
    return True


def migrate(study: Study, store: Store, dry_run: bool = False) -> list[tuple[str, str, RunConfig]]:
    """Rename the old-scheme runs of ``store`` that are runs of ``study`` to their portable ids (their config gets the
    study's paths and ``study_dir``; labels, results and weights are kept). Returns (old id, new id, run) per run
    renamed (or, with ``dry_run``, that would be); a successful run is preferred over a failed one."""
    if not store.root.is_dir():
        raise ConfigError(f"{store.root}: no such store")
    runs = {run.run_id: run for run in expand_runs(study)}
    renamed = []
    for new_id, old_ids in candidates(list(runs.values()), store).items():
        run = runs[new_id]
        verified = []
        for old_id in old_ids:
            result = read_result(store.run_dir(old_id)) or {}
            if old_id == run.legacy_run_id or same_content(run, result):
                verified.append((result.get("status") != "success", old_id, result))
        if not verified:
            continue
        _, old_id, result = min(verified, key=lambda v: v[0])  # success first, else the first found
        labels = result.get("config") or {}
        config = {**run.to_dict(), "study": labels.get("study", run.study), "arm": labels.get("arm", run.arm)}
        if not dry_run:
            store.rename_run(old_id, new_id, config)
        renamed.append((old_id, new_id, run))
    return renamed

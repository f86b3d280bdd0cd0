"""The ``peftbench`` command: subcommands map straight onto plain functions.

    peftbench run [STUDY.toml] [--store DIR] [--set KEY=VALUE ...]   # no STUDY: the built-in offline demo
    peftbench run STUDY.toml --until-decided --max-seeds 10            # add seeds until every verdict is decided
    peftbench run STUDY.toml --report-to tensorboard,mlflow            # each run also logged to these trackers
    peftbench plan [STORE or STUDY.toml]                               # seeds / test examples that would decide
    peftbench validate STUDY.toml                                      # expand and check, train nothing
    peftbench ls [STORE]                                               # runs with status and key metrics
    peftbench train --method lora --r 18 --lora-alpha 36 --lr 3e-4     # one run from flags
    peftbench evaluate RUN_DIR [--dataset SOURCE] [--split test]
    peftbench report [STORE or STUDY.toml] [--study NAME]
    peftbench compare STORE_OR_STUDY [STORE_OR_STUDY ...] --out DIR   # studies side by side
    peftbench export RUN_DIR OUT [--merge] [--push-to-hub REPO]        # a model transformers / peft loads
    peftbench predict RUN_DIR --input texts.csv --output preds.csv     # classify new texts

Exit codes: 0 success, 1 some runs failed, 2 bad input (nothing stored is touched).
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from pathlib import Path
from typing import Any

from peftbench.config import (DATASET_FIELDS, TRAIN_FIELDS, ConfigError, apply_overrides, expand_runs, load_study,
                              validate_study)
from peftbench import progress
from peftbench.methods import LORA_PARAMS, METHODS

# OSErrors that mean the command was pointed at the wrong place (exit 2, like any bad input); others exit 1.
BAD_INPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT,
                    errno.ENAMETOOLONG}

_KIND_TYPES = {int: int, float: float, str: str, "int?": int, "float?": float, "str?": str, "int|str": None,
               "list[str]": str, "list[str]?": str}


def _add_fields(parser: argparse.ArgumentParser, fields: dict, skip: tuple[str, ...] = (), dest_prefix: str = ""):
    """One ``--flag`` per config field (``peftbench.fields.Field``), with the field's doc as help and its choices as
    the flag's (no hand-written duplicate of the schema)."""
    for key, f in fields.items():
        if key in skip:
            continue
        flag = "--" + key.replace("_", "-")
        if f.kind is bool:
            parser.add_argument(flag, dest=dest_prefix + key, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.doc} (default: {f.default})")
            continue
        conv = _KIND_TYPES.get(f.kind)
        parser.add_argument(flag, dest=dest_prefix + key, type=conv or _int_or_str, default=None, choices=f.choices,
                            help=f"{f.doc} (default: {f.default})")


def _int_or_str(text: str):
    return int(text) if text.isdigit() else text


def _picked(args: argparse.Namespace, fields: dict, prefix: str = "") -> dict[str, Any]:
    return {k: getattr(args, prefix + k) for k in fields if getattr(args, prefix + k, None) is not None}


AUTO_JOB_MEMORY = 4 * 2**30  # bytes of free memory ``--jobs auto`` counts per worker (a MiniLM worker holds ~2 GB)


def _jobs(text: str) -> int | str:
    """``--jobs 2`` → 2; ``auto`` stays (resolved once the threads are chosen: one 1-thread job per thread on CPU)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None


def _report_to(text: str) -> list[str]:
    """``--report-to tensorboard,mlflow`` → the tracker names; ``none`` → no tracker (whatever the study says)."""
    from peftbench.trackers import BACKENDS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(BACKENDS)} (comma-separated) or none, got "
                                         f"{text!r}")
    return names


def _tracking_override(args) -> list[str]:
    """``--report-to`` as the ``--set`` override of the study's ``tracking.report_to`` (none given: none)."""
    return [] if args.report_to is None else [f"tracking.report_to={json.dumps(args.report_to)}"]


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    import pandas as pd

    if not rows:
        print("(no runs)")
        return
    frame = pd.DataFrame(rows)[columns]
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


# --------------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    from peftbench.runner import check_study_inputs
    from peftbench.store import Store

    from peftbench.trackers import check

    study = load_study(args.study, args.set)
    check(study.tracking)
    if not args.no_data:
        check_study_inputs(study)
        from peftbench.data import describe_splits
        from peftbench.runner import get_splits

        for spec in study.datasets.values():
            print(describe_splits(spec, get_splits(spec)))
    runs = expand_runs(study)
    store = Store(args.store or study.store)
    rows = [{"run_id": r.run_id, "arm": r.arm, "model": r.model, "dataset": r.dataset["name"],
             "lr": r.train.get("lr"), "scheduler": r.train.get("lr_scheduler"), "seed": r.seed,
             "stored": store.status(r.run_id) or "-"} for r in runs]
    if rows:  # a study whose every arm is searched has no fixed runs
        _print_table(rows, list(rows[0]))
    print(f"{study.name}: {len(runs)} runs, {sum(r['stored'] == 'success' for r in rows)} already in {store.root}")
    if study.search:
        from peftbench import search

        search.check(study)
        print(search.describe(study))
    _notice_old_run_ids(study, store)
    return 0


def _notice_old_run_ids(study, store) -> None:
    from peftbench.migrate import notice

    line = notice(study, store)
    if line:
        print(line, file=sys.stderr)


def cmd_migrate(args) -> int:
    from peftbench.migrate import migrate
    from peftbench.store import Store

    study = load_study(args.study, args.set)
    renamed = migrate(study, Store(args.store), dry_run=args.dry_run)
    for old_id, new_id, run in renamed:
        print(f"{'would rename' if args.dry_run else 'renamed'} {old_id} -> {new_id}: {run.label}")
    print(f"{study.name}: {len(renamed)} runs {'to rename' if args.dry_run else 'renamed'} to portable run ids in "
          f"{Path(args.store).resolve()}")
    return 0


def _run(study, args) -> int:
    from peftbench.environment import set_threads
    from peftbench.runner import check_study_inputs
    from peftbench.store import Store

    until = getattr(args, "until_decided", False)
    if study.search:
        from peftbench import search

        search.check(study, until)  # Optuna installed, no --until-decided
    if until:
        from peftbench import sequential

        sequential.check(study, args.max_seeds, args.seed_step)  # bad settings stop here, before anything runs
    elif getattr(args, "max_seeds", None) is not None:
        raise ConfigError("--max-seeds: only with --until-decided")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ConfigError(f"--threads: expected an integer >= 1, got {args.threads}")
    jobs = getattr(args, "jobs", 1)
    if jobs != "auto" and jobs < 1:
        raise ConfigError(f"--jobs: expected an integer >= 1 or auto, got {jobs}")
    if jobs != 1 and getattr(args, "executor", "local") != "local":
        raise ConfigError("--jobs: only with the local executor (ray runs one task per run: --cpus-per-run)")
    Store(args.store or study.store).check_writable()
    check_study_inputs(study)
    _notice_old_run_ids(study, Store(args.store or study.store))
    executor = getattr(args, "executor", "local")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'peftbench[ray]'") from None
    else:
        threads = set_threads(getattr(args, "threads", None))  # cores less busy ones (Ray: cpus_per_run instead)
        if jobs == "auto":  # on CPU one 1-thread job per thread (as memory allows); one job on an accelerator
            import psutil

            from peftbench.environment import pick_device

            room = max(1, int(psutil.virtual_memory().available // AUTO_JOB_MEMORY))
            jobs = min(threads, room) if pick_device(args.device).type == "cpu" else 1
    summaries = []

    def execute(runs=None):
        if executor == "ray":
            from peftbench.executors import run_ray

            summary = run_ray(study, args.store, device=args.device, retry_failed=not args.no_retry_failed,
                              address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                              max_retries=args.max_retries, runs=runs)
        else:
            from peftbench.executors import run_study

            summary = run_study(study, args.store, device=args.device, retry_failed=not args.no_retry_failed,
                                runs=runs, jobs=jobs)
        summaries.append(summary)
        return summary

    record = None
    if until:
        record = sequential.run_until_decided(study, args.store or study.store, execute, args.max_seeds,
                                              args.seed_step)
    elif study.search:
        record = search.run_search(study, args.store or study.store, execute)
    else:
        execute()
    store = summaries[0].store
    run_ids = record["run_ids"] if record else summaries[0].run_ids
    failed_any = {f for s in summaries for f in s.failed}
    failed = sorted(failed_any & set(run_ids))  # a search's failed trials are failed trials, not failed runs
    print(f"\n{len(set(run_ids))} runs ({sum(s.done for s in summaries)} trained now, "
          f"{sum(s.skipped for s in summaries)} already done" + (f", {sum(len(s.claimed) for s in summaries)} left to another "
                                                    f"runner" if any(s.claimed for s in summaries) else "")
          + f") in {store.resolve()}")
    _summarise(store, run_ids, study)
    if getattr(args, "report", True) and run_ids:
        from peftbench.report import write_report

        out = write_report(store, run_ids=run_ids, study=study, sequential=record if until else None)
        print(f"report: {Path(out).resolve() / 'report.md'}")
        _print_verdicts(Path(out))
    if len(failed_any) > len(failed):
        print(f"{len(failed_any) - len(failed)} search trials failed (each counts as a failed trial)", file=sys.stderr)
    if failed:
        print(f"{len(failed)} runs failed: see 'peftbench ls {store}'", file=sys.stderr)
        return 1
    return 0


def _print_verdicts(report_dir: Path) -> None:
    """The verdict lines of the report just written (read back from its results.json, not recomputed), and what
    would decide the undecided ones."""
    import pandas as pd

    from peftbench.report.document import plan_display, verdict_line
    from peftbench.report.verdict import UNDECIDED

    v = pd.DataFrame(json.loads((report_dir / "results.json").read_text(encoding="utf-8"))["verdicts"])
    if not len(v):
        return
    print("\nverdicts:")
    for _, row in v.iterrows():
        print("  " + verdict_line(row).replace("**", ""))
    if (v["verdict"] == UNDECIDED).any():
        print("\nto decide the undecided ones (80% power):")
        print(plan_display(v).to_string(index=False))


def _summarise(store: Path, run_ids: list[str], study=None) -> None:
    """The end-of-study table: per model, dataset and arm, the runs of its chosen nuisance setting (best validation score,
    as in the report: ``setting``, e.g. ``lr=0.001``, of ``settings`` tried) and their mean test scores."""
    from peftbench.report import load_runs, settings_of
    from peftbench.report.tables import nuisance_scores, select_nuisance

    runs = load_runs(store, run_ids)
    metric = settings_of(study)["selection_metric"]
    ok = select_nuisance(runs, metric) if len(runs) else runs
    if not len(ok):
        return
    keys = ["model", "dataset", "arm"]  # one study's runs; the model column is printed when there are several
    tried = nuisance_scores(runs, metric).groupby(keys, sort=False).size().rename("settings")
    table = ok.groupby(keys, sort=False).agg(
        setting=("setting", "first"), runs=("run_id", "count"), test_accuracy=("test_accuracy", "mean"),
        test_acc_std=("test_accuracy", "std"), test_f1_macro=("test_f1_macro", "mean"),
        trainable_pct=("params_trainable_pct", "mean"), train_time_s=("train_time_s", "mean"))
    table = table.join(tried).reset_index()
    if table["model"].nunique() == 1:
        table = table.drop(columns="model")
    table.insert(list(table.columns).index("setting") + 1, "settings", table.pop("settings"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def cmd_run(args) -> int:
    return _run(load_study(args.study, args.set + _tracking_override(args)), args)


def cmd_train(args) -> int:
    from peftbench.data import dataset_defaults

    source = args.dataset
    if not source.startswith("builtin:") and Path(source).exists():
        source = str(Path(source).resolve())
    dataset = dataset_defaults(source=source, **_picked(args, DATASET_FIELDS, "data_"))
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    raw = {"name": args.name, "models": [model], "datasets": {dataset.pop("name"): dataset}, "seeds": [args.seed],
           "train": _picked(args, TRAIN_FIELDS),
           "arms": [{"method": args.method, **_picked(args, LORA_PARAMS, "lora_")}]}
    # The LoRA flags work for every method that takes the parameter (lora, loraplus, vera, ...); a method that does
    # not gets the usual "unknown key" error. Other method parameters: --set arms.0.KEY=VALUE.
    flags = {*_picked(args, LORA_PARAMS, "lora_"), *_picked(args, TRAIN_FIELDS),
             *_picked(args, DATASET_FIELDS, "data_")}
    try:
        study = validate_study(apply_overrides(raw, args.set + _tracking_override(args)), None)
    except ConfigError as e:  # name the flag the value came from, not its place in the study it made
        raise ConfigError(re.sub(r"^study: (?:arms\[0\]|train|datasets\.[^.:]+)\.(\w+):",
                                 lambda m: f"--{m[1].replace('_', '-')}:" if m[1] in flags else m[0], str(e))) from None
    return _run(study, args)


def cmd_ls(args) -> int:
    from peftbench.store import load_results

    store = Path(args.store)
    if not store.is_dir():
        raise ConfigError(f"{store}: no such store folder")
    df = load_results(store)
    if not len(df):
        print(f"{store}: no runs")
        return 0
    cols = ["run_id", "status", "study", "dataset", "arm", "lr", "seed", "test_accuracy", "test_f1_macro",
            "params_trainable_pct", "train_time_s"]
    df = df[[c for c in cols if c in df.columns]].sort_values(["study", "dataset", "arm", "lr", "seed"])
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    failed = load_results(store).query("status == 'failed'")
    for _, row in failed.iterrows():
        print(f"failed {row['run_id']}: {row['error']}")
    return 0


def cmd_evaluate(args) -> int:
    from peftbench.data import dataset_defaults
    from peftbench.runner import evaluate_saved

    dataset = None
    if args.dataset:
        source = str(Path(args.dataset).resolve()) if Path(args.dataset).exists() else args.dataset
        dataset = dataset_defaults(source=source, **_picked(args, DATASET_FIELDS, "data_"))
    metrics = evaluate_saved(args.run, dataset, args.split, args.device)
    print(json.dumps(metrics, indent=2))
    return 0


def _report_target(args):
    """(store, run ids or None, study or None, sequential record or None) of ``report``/``plan``'s argument."""
    from peftbench.report import report_target

    return report_target(args.target, args.set, args.store, getattr(args, "study", None))


def cmd_report(args) -> int:
    from peftbench.report import write_report

    store, run_ids, study, record = _report_target(args)
    out = write_report(store, run_ids=run_ids, study=study, out_dir=args.out, sequential=record)
    print(f"report: {Path(out).resolve() / 'report.md'}")
    return 0


def cmd_compare(args) -> int:
    from peftbench.report.compare import write_comparison

    out = write_comparison(args.targets, args.out, args.set, args.store)
    print(f"comparison: {Path(out).resolve() / 'report.md'}")
    return 0


def cmd_plan(args) -> int:
    from peftbench.report import study_analysis
    from peftbench.report.document import plan_display, verdict_display
    from peftbench.report.verdict import UNDECIDED

    store, run_ids, study, record = _report_target(args)
    analysis = study_analysis(store, run_ids, study, record)
    v = analysis["verdicts"]
    if not len(v):
        print("no verdicts: no reference arm with a comparison among the successful runs")
        return 0
    several = "studies" in analysis  # a store of several studies: each row names its study
    shown = verdict_display(v)[["Arm", "Reference", "Seeds arm / ref", "Test examples", "Δ (pts)", "CI of Δ",
                                "Verdict"]]
    if several:
        shown.insert(0, "Study", v["study"].to_numpy())
    print(shown.to_string(index=False))
    plan = plan_display(v)
    if several and len(plan):
        plan.insert(0, "Study", v.loc[v["verdict"] == UNDECIDED, "study"].to_numpy())
    if len(plan):
        print("\nwhat would decide the undecided comparisons with 80% power:")
        print(plan.to_string(index=False))
    else:
        print("\nevery comparison is decided.")
    return 0


def cmd_export(args) -> int:
    from peftbench.export import export_run, push_to_hub

    out = export_run(args.run, args.out, merge=args.merge)
    print(f"exported: {Path(out).resolve()} (see its README.md)")
    if args.push_to_hub:
        print(f"pushed to the hub: {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0


def cmd_predict(args) -> int:
    from peftbench.export import predict_file

    preds = predict_file(args.run, args.input, args.output, text_column=args.text_column,
                         batch_size=args.batch_size, device=args.device)
    print(f"{len(preds)} predictions: {Path(args.output).resolve()}")
    return 0


# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftbench", description="Controlled fine-tuning studies: full FT vs "
                                     "LoRA vs frozen encoders, stored per run and reported honestly.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, study_arg=True):
        if study_arg:
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a study setting, e.g. --set train.epochs=1 --set 'seeds=[0]'")
        p.add_argument("--store", default=None, help="store folder (default: the study's 'store', i.e. ./runs)")

    def running(p):
        p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
        p.add_argument("--threads", type=int, default=None,
                       help="torch threads of the local executor (default: the physical cores, fewer when the load "
                            "average shows other jobs on them; OMP_NUM_THREADS also chooses)")
        p.add_argument("--no-retry-failed", action="store_true", help="skip runs that failed before")
        p.add_argument("--no-report", dest="report", action="store_false", help="do not write the report")
        p.add_argument("--report-to", type=_report_to, default=None, metavar="TRACKERS",
                       help="also log each run to these experiment trackers: tensorboard, mlflow, wandb "
                            "(comma-separated), or none (default: the study's tracking.report_to)")

    p = sub.add_parser("run", help="run a study (default: the built-in offline demo)")
    p.add_argument("study", nargs="?", default=None, help="study file (.toml or .yaml)")
    common(p)
    running(p)
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one run after another in this process (or --jobs at a time); ray: each run as a Ray "
                        "task (docs/scale-out.md)")
    p.add_argument("--jobs", type=_jobs, default=1,
                   help="local: train this many runs at once, in worker processes sharing the torch threads; auto: "
                        "on CPU one 1-thread job per thread (at most one per 4 GB of free memory), else 1 (default: "
                        "1, in this process; the demo on 2 cores ran 1.4x faster with 2)")
    p.add_argument("--address", default=None,
                   help="ray: cluster to join, 'auto' or 'ray://HOST:10001' (default: RAY_ADDRESS, or a local Ray)")
    p.add_argument("--cpus-per-run", type=float, default=1,
                   help="ray: CPUs each run reserves; also its torch thread count (default: 1)")
    p.add_argument("--gpus-per-run", type=float, default=0,
                   help="ray: GPUs each run reserves, 0.5 shares a GPU between two runs (default: 0, CPU)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="ray: times a run is retried when its worker dies, before it is stored as failed "
                        "(default: 2)")
    p.add_argument("--until-decided", action="store_true",
                   help="after the study, add the next unused seeds to undecided arms and their reference, look by "
                        "look, until every verdict is decided or --max-seeds is reached (group-sequential levels: "
                        "docs/report.md)")
    p.add_argument("--max-seeds", type=int, default=None,
                   help="--until-decided: seeds per arm at most (default: 2 x the study's seeds + 4)")
    p.add_argument("--seed-step", type=int, default=2,
                   help="--until-decided: seeds added per look (default: 2)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a study and list its runs without training")
    p.add_argument("study", help="study file (.toml or .yaml)")
    p.add_argument("--no-data", action="store_true", help="do not load the datasets")
    common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("migrate", help="rename a store's runs from the run ids of an older peftbench (absolute "
                       "paths) to portable ones")
    p.add_argument("store", help="store folder")
    p.add_argument("--study", required=True, help="study file whose runs to look for")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study setting")
    p.add_argument("--dry-run", action="store_true", help="list the runs that would be renamed, rename nothing")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("ls", help="list the runs of a store")
    p.add_argument("store", nargs="?", default="runs")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("train", help="one run from flags, into the store")
    p.add_argument("--model", default="builtin:minilm", help="builtin:minilm, a hub id or a local folder")
    p.add_argument("--dataset", default="builtin:rotten_tomatoes", help="builtin:rotten_tomatoes, a hub id or a path")
    p.add_argument("--method", default="lora", help=f"one of {', '.join(METHODS)}; parameters without a flag: "
                   "--set arms.0.KEY=VALUE (e.g. --set arms.0.init_r=12 for adalora)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="train", help="study label stored with the run")
    _add_fields(p, LORA_PARAMS, dest_prefix="lora_")
    _add_fields(p, TRAIN_FIELDS)
    _add_fields(p, DATASET_FIELDS, skip=("source",), dest_prefix="data_")
    common(p)
    running(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a stored run (or its adapter folder) on a dataset split")
    p.add_argument("run", help="run folder, or its adapter/ folder")
    p.add_argument("--dataset", default=None, help="dataset source (default: the run's own dataset)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--device", default="auto")
    _add_fields(p, DATASET_FIELDS, skip=("source",), dest_prefix="data_")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="tables, plots and a verdict from a store or a study's runs")
    p.add_argument("target", nargs="?", default="runs", help="store folder or study file")
    p.add_argument("--out", default=None, help="report folder (default: STORE/report)")
    p.add_argument("--study", default=None, metavar="NAME", help="only the runs of the study of this name (a store "
                   "of several studies is otherwise reported with one section per study)")
    common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="studies or stores side by side (same arms, other datasets or models): a "
                       "table with one column group per study, and each study's verdicts")
    p.add_argument("targets", nargs="+", metavar="STORE_OR_STUDY", help="store folders or study files")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier comparison)")
    common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plan", help="verdicts and the seeds / test examples that would decide the undecided ones")
    p.add_argument("target", nargs="?", default="runs", help="store folder or study file")
    p.add_argument("--study", default=None, metavar="NAME", help="only the runs of the study of this name")
    common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write a run's model for transformers (merged) or peft (adapter + head)")
    p.add_argument("run", help="run folder")
    p.add_argument("out", help="folder to create (must not exist or be empty)")
    p.add_argument("--merge", action="store_true", help="merge adapter weights into the model (plain transformers "
                   "loads it); without it a peft run is exported as its adapter, head included")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub model repository "
                   "(created if missing; token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify the texts of a file with a run (or exported) folder")
    p.add_argument("run", help="run folder, or a folder written by 'peftbench export'")
    p.add_argument("--input", required=True, help="CSV, TSV, JSONL or Parquet file with a text column")
    p.add_argument("--output", required=True, help="predictions file (.csv, .tsv, .jsonl or .parquet): id, text, "
                   "pred_label, prob_<label> per label")
    p.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    p.add_argument("--batch-size", type=int, default=None, help="texts per forward pass (default: the run's "
                   "eval_batch_size)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.set_defaults(func=cmd_predict)
    return parser


def _printable(text: str) -> str:
    """One line whatever the message quotes: newlines and other control characters (from a study's keys and values,
    or a data file) are shown escaped, as Python would write them."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peftbench`` console script."""
    args = build_parser().parse_args(argv)
    try:
        progress.quiet_libraries()  # no loading bars or "LOAD REPORT" warnings per run
        return args.func(args)
    except ConfigError as e:
        print(f"peftbench: error: {_printable(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the store or a report folder could not be written (read-only, disk full, a file in the way)
        where = f"{e.filename}: " if e.filename else ""
        print(f"peftbench: error: {_printable(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2 if e.errno in BAD_INPUT_ERRNOS else 1
    except KeyboardInterrupt:
        print("\npeftbench: interrupted; finished runs are kept, the run in progress was discarded",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

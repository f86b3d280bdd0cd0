"""Reports from the run store: tables, efficiency, a non-inferiority verdict, plots and error analysis.

Reads only the store (result.json, metrics.jsonl, predictions.parquet of each run), never retrains, and can be re-run
at any time. The work is split into pure functions (``tables``, ``verdict``, ``errors``, ``plots``, ``render``,
``document``); :func:`write_report` is the one function that writes files. docs/report.md explains every section.

Example::

    >>> from peftbench.report import write_report
    >>> out = write_report("runs")          # doctest: +SKIP
    >>> sorted(p.name for p in out.iterdir())  # doctest: +SKIP
    ['per_class.csv', 'plots', 'report.html', 'report.md', 'results.csv', 'results.json', 'runs.csv', 'table.md', 'table.tex']

or from the shell: ``peftbench report runs`` (a store) or ``peftbench report studies/demo.toml`` (a study's runs).
Runs of different studies are never pooled: a store of several studies is reported with one section per study
(``--study NAME`` reports one); :mod:`peftbench.report.compare` puts studies side by side.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from peftbench import methods, spectrum
from peftbench.config import REPORT_FIELDS
from peftbench.report import calibration, document, errors, plots, render, tables, verdict
from peftbench.store import METRICS, PREDICTIONS, Store, flatten, fresh_sibling, swap_in, write_json

DEFAULT_SETTINGS = {name: f.default for name, f in REPORT_FIELDS.items()}  # a study's [report] without keys
# The metrics with a per-example linearisation (verdict.influence): every stored one but ROC-AUC.
PAIRED_METRICS = tuple(m for m in tables.METRICS if m != "roc_auc")


# --------------------------------------------------------------------------------------------------------------------
# Reading the store
# --------------------------------------------------------------------------------------------------------------------


def load_runs(store: str | Path, run_ids: list[str] | None = None) -> pd.DataFrame:
    """One row per stored run: :func:`peftbench.store.flatten` plus ``nuisance`` (the run's train settings as
    canonical JSON), ``labels`` and ``test_confusion_matrix``. Run ids without a finished folder are skipped."""
    rows = []
    for result in Store(store).results(run_ids):
        row = flatten(result)
        train = (result.get("config") or {}).get("train")
        row["nuisance"] = json.dumps(train, sort_keys=True) if train is not None else None
        row["labels"] = result.get("labels") or []
        row["dataset_info"] = result.get("dataset_info") or {}
        row["test_confusion_matrix"] = ((result.get("metrics") or {}).get("test") or {}).get("confusion_matrix")
        rows.append(row)
    return tables.ensure_columns(pd.DataFrame(rows))


def _read(run_dir: Any, name: str, reader) -> pd.DataFrame | None:
    if not isinstance(run_dir, str):
        return None
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    try:
        return reader(path)
    except Exception:  # a damaged file: the report says the run has no predictions/curves rather than crashing
        return None


def load_predictions(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each successful run's predictions.parquet (runs without one are left out): run id → a frame with one row per
    test example: ``id``, ``text``, ``label`` and ``pred`` (class indices), ``probs`` (one array per row),
    ``length`` (tokens). ``runs``: a :func:`peftbench.load_results` frame (or a subset of its rows)."""
    out = {}
    for _, row in runs[runs["status"] == "success"].iterrows():
        frame = _read(row["path"], PREDICTIONS, pd.read_parquet)
        if frame is not None and {"id", "label", "pred"} <= set(frame.columns):
            out[row["run_id"]] = frame
    return out


def load_curves(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each successful run's metrics.jsonl: run id → a frame with one row per epoch (``epoch``, ``step``,
    ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``val_f1_macro``, ..., ``examples_per_s``,
    ``lr``). ``runs``: a :func:`peftbench.load_results` frame (or a subset of its rows)."""
    out = {}
    for _, row in runs[runs["status"] == "success"].iterrows():
        frame = _read(row["path"], METRICS, lambda p: pd.read_json(p, lines=True))
        if frame is not None and len(frame):
            out[row["run_id"]] = frame
    return out


def report_target(target: str | Path, overrides: list[str] | None = None, store: str | Path | None = None,
                  study_name: str | None = None) -> tuple[Path, list[str] | None, Any, dict[str, Any] | None]:
    """What ``peftbench report`` / ``plan`` / ``compare`` read for ``target``, a study file or a store folder:
    ``(store, run ids or None, study or None, sequential record or None)``. A study file gives its own runs (and those
    ``--until-decided`` added), in its store (``store`` overrides it); ``study_name`` keeps only the runs of the study
    of that name. ConfigError (one line) when there is nothing to report on."""
    from peftbench.config import ConfigError, expand_runs, load_study

    path = Path(target)
    study, record = None, None
    if path.is_file():
        study = load_study(path, overrides)
        root = Path(store or study.store)
        run_ids = [r.run_id for r in expand_runs(study)]
        record = Store(root).read_sequential(study.name)
        if record:
            run_ids = list(dict.fromkeys(run_ids + record["run_ids"]))
        if study.search:  # the searched arms' runs: each one's best setting on every seed (not the other trials)
            run_ids = list(dict.fromkeys(run_ids + ((Store(root).read_search(study.name) or {}).get("run_ids") or [])))
    else:
        root, run_ids = path, None
    if not Store(root).run_ids():
        raise ConfigError(f"{root}: no finished runs to report on")
    if study_name is not None:
        results = Store(root).results(run_ids)
        run_ids = [r["run_id"] for r in results if (r.get("config") or {}).get("study") == study_name]
        if not run_ids:
            names = sorted({str((r.get("config") or {}).get("study")) for r in results})
            raise ConfigError(f"{root}: no runs of study '{study_name}' (studies here: {', '.join(names)})")
    return root, run_ids, study, record


def settings_of(study: Any = None) -> dict[str, Any]:
    """The study's [report] settings (checked when the study was loaded) over the defaults of
    ``config.REPORT_FIELDS`` (reference 'full', accuracy, margin 1 point)."""
    return {**DEFAULT_SETTINGS, **(getattr(study, "report", None) or {})}


# --------------------------------------------------------------------------------------------------------------------
# Analysis (pure)
# --------------------------------------------------------------------------------------------------------------------


def arm_predictions(arm_row: pd.Series, selected: pd.DataFrame,
                    predictions: dict[str, pd.DataFrame]) -> dict[Any, pd.DataFrame]:
    """``{seed: predictions}`` of an arm's chosen runs (those with stored predictions)."""
    ids = arm_row["run_ids"].split()
    runs = selected[selected["run_id"].isin(ids)]
    return {int(r["seed"]) if pd.notna(r["seed"]) else r["run_id"]: predictions[r["run_id"]]
            for _, r in runs.iterrows() if r["run_id"] in predictions}


def prediction_checks(runs: pd.DataFrame, predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Test accuracy recomputed from each run's predictions.parquet beside the value in its result.json."""
    rows = []
    for _, row in runs[runs["run_id"].isin(list(predictions))].iterrows():
        again = errors.recomputed_accuracy(predictions[row["run_id"]])
        stored = row["test_accuracy"]
        rows.append({"run_id": row["run_id"], "study": row.get("study"), "arm": row["arm"], "seed": row["seed"],
                     "stored": stored, "recomputed": again,
                     "match": bool(pd.notna(stored) and abs(again - stored) < 1e-9)})
    return pd.DataFrame(rows, columns=["run_id", "study", "arm", "seed", "stored", "recomputed", "match"])


def group_verdicts(group: pd.DataFrame, ref: pd.Series | None, preds: dict[str, dict], settings: dict[str, Any],
                   num_labels: int | None, metric: str) -> pd.DataFrame:
    """Every arm of one study × model × dataset group against its reference (:mod:`peftbench.report.verdict`):
    one-sided tests at the study's level, Holm-adjusted over the arms still open. With a sequential record
    (``--until-decided``), an arm decided at an earlier look keeps that look's verdict and numbers (group-sequential:
    a decision is final)."""
    if ref is None:
        return pd.DataFrame()
    decided = (settings.get("sequential") or {}).get("decided", {})
    alpha = float(settings.get("alpha", verdict.ALPHA))
    model, dataset = group["model"].iloc[0], group["dataset"].iloc[0]
    fixed, open_rows = [], []
    for _, cand in group.iterrows():
        if cand["arm"] == ref["arm"]:
            continue
        head = {"study": cand.get("study"), "model": model, "dataset": dataset, "arm": cand["arm"],
                "method": cand["method"],
                "reference": ref["arm"], "trainable_pct": cand["params_trainable_pct"]}
        earlier = decided.get(sequential_key(model, dataset, cand["arm"]))
        if earlier is not None:
            fixed.append({**earlier, **head})
            continue
        result = verdict.compare(preds[ref["arm"]], preds[cand["arm"]], margin=float(settings["margin"]),
                                 metric=metric, num_labels=num_labels, alpha=alpha)
        open_rows.append({**head, **result})
    verdict.decide_all(open_rows, alpha)
    rows = fixed + open_rows
    order = {a: i for i, a in enumerate(group["arm"])}
    return pd.DataFrame(sorted(rows, key=lambda r: order.get(r["arm"], 0)))


def sequential_key(model: str, dataset: str, arm: str) -> str:
    """How a sequential record names an arm: ``model | dataset | arm``."""
    return f"{model} | {dataset} | {arm}"


def baseline_check(group: pd.DataFrame, preds: dict[str, dict], num_labels: int | None) -> dict[str, Any] | None:
    """The untrained head against the majority-class baseline (not against nothing): Δ in accuracy points with its
    95% CI over seeds and test examples. None unless the group has both with predictions."""
    arms = {role: group.loc[group["method"].isin(methods.with_role(role)), "arm"] for role in ("floor", "untrained")}
    if any(not len(a) or not preds.get(a.iloc[0]) for a in arms.values()):
        return None
    floor, untrained = arms["floor"].iloc[0], arms["untrained"].iloc[0]
    result = verdict.compare(preds[floor], preds[untrained], margin=0.0, metric="accuracy", num_labels=num_labels)
    return {"majority": floor, "untrained": untrained,
            **{k: result.get(k) for k in ("reference_score", "candidate_score", "diff_points", "ci_low", "ci_high")}}


def run_labels(selected: pd.DataFrame, run_ids: list[str]) -> list[str]:
    """The label names the first of ``run_ids`` that recorded any has (runs of one dataset share them)."""
    return list(next((lab for lab in selected.loc[selected["run_id"].isin(run_ids), "labels"] if len(lab)), []))


def with_example_intervals(table: pd.DataFrame, selected: pd.DataFrame,
                           predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The arm table with each paired metric's 95% CI recomputed from the stored predictions so that it covers test-set
    sampling as well as seeds (:func:`peftbench.report.verdict.arm_interval`); ``ci_method`` says what the headline
    interval covers. Arms without predictions keep the seeds-only interval of :func:`tables.arm_table`."""
    table = table.copy()
    for i, row in table.iterrows():
        frames = arm_predictions(row, selected, predictions)
        labels = run_labels(selected, row["run_ids"].split())
        for m in PAIRED_METRICS:
            ci = verdict.arm_interval(frames, m, len(labels) or None)
            if ci is None:
                break
            table.loc[i, f"{m}_ci_low"], table.loc[i, f"{m}_ci_high"] = ci["low"], ci["high"]
            if m == "accuracy":
                table.loc[i, "ci_method"] = f"{ci['covers']} (t, df {ci['df']:.3g})"
    return table


def analyse_group(group: pd.DataFrame, selected: pd.DataFrame, predictions: dict[str, pd.DataFrame],
                  curves: dict[str, pd.DataFrame], settings: dict[str, Any]) -> dict[str, Any]:
    """Verdicts, error analysis and curves of one study × model × dataset group (its rows of the arm table)."""
    metric = settings["metric"]
    paired_metric = metric if metric in PAIRED_METRICS else "accuracy"
    preds = {row["arm"]: arm_predictions(row, selected, predictions) for _, row in group.iterrows()}
    labels = run_labels(selected, " ".join(group["run_ids"]).split())
    out: dict[str, Any] = {"study": group["study"].iloc[0], "model": group["model"].iloc[0],
                           "dataset": group["dataset"].iloc[0], "table": group,
                           "labels": list(labels), "paired_metric": paired_metric}

    ref = tables.find_reference(group, settings["reference"])
    out["reference"] = None if ref is None else ref["arm"]
    out["verdicts"] = group_verdicts(group, ref, preds, settings, len(labels) or None, paired_metric)
    out["baseline_check"] = baseline_check(group, preds, len(labels) or None)

    best = tables.best_arm(group, metric)
    out["best"] = None if best is None else best["arm"]
    with_preds = {arm: p for arm, p in preds.items() if p}
    out["by_length"] = errors.error_by_length(with_preds)
    if best is not None and preds.get(best["arm"]):
        out["per_class"] = errors.per_class(preds[best["arm"]], labels)
        out["mistakes"] = errors.confident_mistakes(preds[best["arm"]], labels)
        out["confusion"] = errors.confusion(preds[best["arm"]], len(labels) or int(out["per_class"].shape[0]))
    else:
        out["per_class"] = out["mistakes"] = None
        best_ids = [] if best is None else best["run_ids"].split()
        stored = selected.loc[selected["run_id"].isin(best_ids), "test_confusion_matrix"].dropna().tolist()
        out["confusion"] = sum(pd.DataFrame(m).to_numpy() for m in stored) if stored else None

    out.update(class_analysis(with_preds, labels, out["confusion"], settings))

    # Disagreements: the reference against the best LoRA arm (else the best other arm with predictions).
    out["pair"], out["disagree_counts"], out["disagree"] = None, None, None
    if ref is not None and preds.get(ref["arm"]):
        others = group[(group["arm"] != ref["arm"]) & group["arm"].isin(list(with_preds))]
        adapters = others[others["method"].isin(methods.with_role("adapter"))]
        other = tables.best_arm(adapters if len(adapters) else others, metric)
        if other is not None:
            counts, table = errors.disagreements(preds[ref["arm"]], preds[other["arm"]], labels)
            out["pair"], out["disagree_counts"], out["disagree"] = (ref["arm"], other["arm"]), counts, table

    arm_curves = {}
    for _, row in group.iterrows():
        frames = [curves[i] for i in row["run_ids"].split() if i in curves]
        if frames:
            arm_curves[row["arm"]] = pd.concat(frames, ignore_index=True)
    out["curves"] = arm_curves
    return out


def class_analysis(with_preds: dict[str, dict], labels: list[str], confusion, settings: dict[str, Any]) -> dict:
    """Per-class metrics of every arm, the top confusions of the best arm's matrix, calibration (ECE and reliability
    bins) and, with ``report.out_of_scope_label``, in-scope accuracy and out-of-scope recall per arm."""
    oos = settings.get("out_of_scope_label")
    table, bins = calibration.calibration_table(with_preds)
    return {"per_class_arms": errors.per_class_arms(with_preds, labels), "calibration": table, "reliability": bins,
            "top_confusions": None if confusion is None else errors.top_confusions(confusion, labels),
            "out_of_scope": errors.out_of_scope_table(with_preds, labels, oos) if oos else None}


def data_sections(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """One entry per dataset: the ``dataset_info`` its runs recorded (split sizes, class shares, carved splits,
    duplicates and label conflicts, see :func:`peftbench.data.make_splits`) — the first successful run's, since every
    run of a dataset spec sees the same splits."""
    out, seen = [], set()
    if "dataset_info" not in runs:
        return out
    for _, row in runs[runs["status"] == "success"].iterrows():
        info = row["dataset_info"]
        if isinstance(info, dict) and info and row["dataset"] not in seen:
            seen.add(row["dataset"])
            out.append({"dataset": row["dataset"], "labels": list(row["labels"]), **info})
    return out


def study_names(runs: pd.DataFrame) -> list[Any]:
    """The studies of ``runs`` (their ``study`` labels, None for runs that record none), sorted by name."""
    names = {None if pd.isna(s) else s for s in runs["study"]} if "study" in runs and len(runs) else set()
    return sorted(names, key=lambda n: (n is None, str(n)))


def of_study(runs: pd.DataFrame, name: Any) -> pd.DataFrame:
    """The rows of ``runs`` whose study is ``name`` (None: the rows that record no study)."""
    return runs[runs["study"].isna() if name is None else runs["study"] == name]


def analyse(runs: pd.DataFrame, predictions: dict[str, pd.DataFrame], curves: dict[str, pd.DataFrame],
            settings: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, as tables: nuisance choice, arm table, efficiency, per-group verdicts and error
    analysis, failed runs, prediction checks. Pure.

    Runs of different studies are never pooled, even when they share model, dataset and arm label: every table is
    grouped by study, and when ``runs`` span several studies each is analysed on its own (``analysis["studies"]``:
    study → its analysis; the top-level tables are theirs, concatenated, each row naming its study)."""
    runs = tables.ensure_columns(runs)
    names = study_names(runs)
    if len(names) > 1:
        parts = {name: analyse(of_study(runs, name), predictions, curves, settings) for name in names}
        return {**combined(parts), "settings": settings, "runs": runs, "studies": parts}
    scores = tables.nuisance_scores(runs, settings["selection_metric"])
    selected = tables.select_nuisance(runs, settings["selection_metric"])
    table = tables.arm_table(selected)
    if len(table):
        table = with_example_intervals(table, selected, predictions)
    groups = []
    if len(table):
        for _, group in table.groupby(["model", "dataset"], sort=False, dropna=False):
            groups.append(analyse_group(group.reset_index(drop=True), selected, predictions, curves, settings))
    verdicts = [g["verdicts"] for g in groups if len(g["verdicts"])]
    lr_summary, lr_grid = tables.lr_readout(scores, settings["reference"], settings["selection_metric"])
    return {"settings": settings, "runs": runs, "nuisance": scores, "selected": selected, "table": table,
            "efficiency": tables.efficiency(table, settings["reference"], settings["metric"]) if len(table) else
            pd.DataFrame(), "verdicts": pd.concat(verdicts, ignore_index=True) if verdicts else pd.DataFrame(),
            "groups": groups, "failed": tables.failed_runs(runs),
            "tuning": tables.tuning_curves(scores, settings["selection_metric"]),
            "data": data_sections(runs),
            "summary": tables.runs_summary(runs, set(selected["run_id"]) if len(selected) else set()),
            "checks": prediction_checks(runs, predictions), "lr_readout": lr_summary, "lr_grid": lr_grid}


def combined(parts: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The analyses of several studies (study → analysis) as one: each table concatenated (its rows name their
    study), the groups and the data sections (each naming its study) one after the other."""
    first = next(iter(parts.values()))
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, pd.DataFrame):
            frames = [p[key] for p in parts.values() if len(p[key])]
            out[key] = pd.concat(frames, ignore_index=True) if frames else value
    out["groups"] = [g for p in parts.values() for g in p["groups"]]
    out["data"] = [{"study": name, **d} for name, p in parts.items() for d in p["data"]]
    return out


def _of_group(frame: pd.DataFrame | None, g: dict[str, Any]) -> pd.DataFrame | None:
    if frame is None or not len(frame):
        return frame
    same = (frame["model"] == g["model"]) & (frame["dataset"] == g["dataset"])
    if "study" in frame and "study" in g:
        same &= frame["study"].isna() if pd.isna(g["study"]) else frame["study"] == g["study"]
    return frame[same]


def figures(analysis: dict[str, Any], prefix: str = "") -> dict[str, list[tuple[str, bytes, str]]]:
    """PNG figures per group key ("dataset · model"): a list of (file name, PNG bytes, caption); file names start
    with ``prefix`` (one per study in a report of several)."""
    metric = analysis["settings"]["metric"]
    several = len(analysis["groups"]) > 1
    out = {}
    for i, g in enumerate(analysis["groups"]):
        suffix = f"-{i + 1}" if several else ""
        made = [("metric_vs_rank", plots.metric_vs_rank(g["table"], metric), f"test {metric} vs LoRA rank"),
                ("metric_vs_params", plots.metric_vs_params(g["table"], metric),
                 f"test {metric} vs trainable parameters, Pareto frontier ringed; baselines without a fine-tuned "
                 "encoder as horizontal lines"),
                ("training_curves", plots.training_curves(g["curves"]), "training curves per arm (mean over seeds)"),
                ("confusion_matrix", None if g["confusion"] is None or len(g["confusion"]) > errors.MANY_CLASSES
                 else plots.confusion_matrix(
                    g["confusion"], g["labels"] or [str(k) for k in range(len(g["confusion"]))],
                    f"{g['best']} (seeds summed)"), f"confusion matrix of the best arm, {g['best']}"),
                ("train_time", plots.train_time(g["table"]), "training time per arm"),
                ("reliability", plots.reliability_diagram(g.get("reliability"), g.get("calibration")),
                 "reliability diagram: accuracy vs confidence in 15 equal-width bins per arm, seeds pooled"),
                ("tuning_curves", plots.tuning_curves(
                    _of_group(analysis.get("tuning"), g), analysis["settings"]["selection_metric"]),
                 "expected best validation score vs tuning trials per arm (Dodge et al. 2019)"),
                ("lr_curves", plots.lr_curves(_of_group(analysis.get("lr_grid"), g),
                                              analysis["settings"]["selection_metric"]),
                 "mean validation score vs learning rate per arm (★ = best; the learning-rate readout)"),
                ("spectrum", spectrum.spectrum_figure(g["spectra"]) if g.get("spectra") else None,
                 "spectrum of the learned updates ΔW per arm (chosen runs)"),
                ("intruders", plots.intruder_curves(spectrum.intruder_curves(g.get("spectra") or {})),
                 "intruder dimensions per run vs similarity threshold ε per arm (chosen runs)")]
        out[document.group_key(g)] = [(f"{prefix}{name}{suffix}.png",
                                       plots.png(plots.titled(fig, document.group_key(g))), caption)
                                      for name, fig, caption in made if fig is not None]
    return out


# --------------------------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------------------------


def study_analysis(store, run_ids=None, study=None, sequential: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the store and :func:`analyse` it (all its runs, or ``run_ids``) with the study's [report] settings and,
    after ``--until-decided``, its sequential record (the last look's level; arms decided earlier keep their
    verdicts). The spectra of the chosen runs are attached to each group."""
    settings = settings_of(study)
    if sequential:
        settings["sequential"] = sequential
        settings["alpha"] = sequential["levels"][len(sequential["looks"]) - 1] if sequential["looks"] else \
            sequential["levels"][0]
    runs = load_runs(store, run_ids)
    analysis = analyse(runs, load_predictions(runs), load_curves(runs), settings)
    for g in analysis["groups"]:  # spectrum.json of the chosen runs, in the arm table's order
        ids = " ".join(g["table"]["run_ids"]).split()
        chosen = analysis["selected"].set_index("run_id").loc[[i for i in ids if i in
                                                               set(analysis["selected"]["run_id"])]].reset_index()
        g["spectra"] = spectrum.load_spectra(chosen)
    return analysis


def write_report(store, run_ids=None, study=None, out_dir=None, sequential: dict[str, Any] | None = None) -> Path:
    """Write the report of a store (all its runs, or ``run_ids``) into ``out_dir`` (default ``STORE/report``) and
    return that folder: report.md, report.html (the other files embedded), results.csv, results.json, runs.csv,
    per_class.csv, table.md, table.tex, plots/.

    ``study`` (a :class:`peftbench.config.Study`) supplies the title and its [report] settings: reference arm,
    headline metric, selection metric and non-inferiority margin; ``sequential`` the record of an
    ``--until-decided`` run (see :mod:`peftbench.sequential`)."""
    store = Path(store)
    out = Path(out_dir) if out_dir else store / "report"
    _check_report_folder(out)
    analysis = study_analysis(store, run_ids, study, sequential)
    settings = analysis["settings"]
    runs = analysis["runs"]
    figs = report_figures(analysis)
    title = getattr(study, "name", None) or store.resolve().name
    meta = {"title": title, "store": str(store), "question": getattr(study, "description", "") or "",
            "not_run": len(set(run_ids)) - len(runs) if run_ids is not None else 0}

    final, out = out, fresh_sibling(out)  # built aside, then swapped in: never a report pointing at missing plots
    try:
        _write_files(out, analysis, figs, meta, settings, title)
        swap_in(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final


def _write_files(out: Path, analysis: dict[str, Any], figs: dict, meta: dict[str, Any], settings: dict[str, Any],
                 title: str) -> None:
    """Every file of the report, into the (new, empty) folder ``out``."""
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for items in figs.values():
        for name, data, _ in items:
            (plot_dir / name).write_bytes(data)
    has_arms = len(analysis["table"]) > 0
    parts = analysis.get("studies") or {}
    shown = document.arm_display(analysis["table"], settings["metric"]) if has_arms else None
    if parts and has_arms:  # several studies: each row names its study
        shown.insert(0, "Study", [_study_label(x) for x in analysis["table"]["study"]])
    (out / "table.md").write_text(render.markdown_table(shown) + "\n" if has_arms else "_(no successful runs)_\n",
                                  encoding="utf-8")
    tex = [render.latex_table(p["table"], f"{title}: {_study_label(name)}") for name, p in parts.items()
           if len(p["table"])] if parts else [render.latex_table(analysis["table"], title)] if has_arms else []
    (out / "table.tex").write_text("\n".join(tex), encoding="utf-8")
    analysis["table"].to_csv(out / "results.csv", index=False)
    analysis["summary"].to_csv(out / "runs.csv", index=False)
    document.per_class_csv(analysis).to_csv(out / "per_class.csv", index=False)
    results = document.results_json(analysis, meta)
    if parts:
        for entry, g in zip(results["groups"], analysis["groups"]):
            entry["study"] = render.jsonable(g["study"])
        results["studies"] = [render.jsonable(name) for name in parts]
    write_json(out / "results.json", results)
    md_blocks = report_blocks(analysis, {k: [(f"plots/{n}", d, c) for n, d, c in v] for k, v in figs.items()}, meta)
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    (out / "report.md").write_text(render.markdown(md_blocks, set(files) | {"report.html", "plots"}),
                                   encoding="utf-8")
    (out / "report.html").write_text(render.html_page(md_blocks, f"peftbench report: {title}",
                                                      {**files, **document.doc_files()}), encoding="utf-8")


def _study_label(name: Any) -> str:
    return "(no study)" if name is None or (isinstance(name, float) and pd.isna(name)) else str(name)


def report_figures(analysis: dict[str, Any]) -> dict[Any, list[tuple[str, bytes, str]]]:
    """:func:`figures`; for a report of several studies, each study's figures (files ``studyN-*.png``) keyed by
    (study index, group key)."""
    parts = analysis.get("studies")
    if not parts:
        return figures(analysis)
    return {(i, key): items for i, part in enumerate(parts.values())
            for key, items in figures(part, prefix=f"study{i + 1}-").items()}


def report_blocks(analysis: dict[str, Any], figs: dict[Any, list], meta: dict[str, Any]) -> list[tuple]:
    """The report as blocks (:func:`peftbench.report.document.blocks`). Several studies: an overview, then one
    section per study — that study's whole report, its headings one level down."""
    parts = analysis.get("studies")
    if not parts:
        return document.blocks(analysis, figs, meta)
    runs = analysis["runs"]
    overview = pd.DataFrame([{"Study": _study_label(name), "Runs": str(len(p["runs"])),
                              "Succeeded": str(int((p["runs"]["status"] == "success").sum())),
                              "Arms": str(len(p["table"])),
                              "Models": ", ".join(dict.fromkeys(map(str, p["runs"]["model"]))),
                              "Datasets": ", ".join(dict.fromkeys(map(str, p["runs"]["dataset"])))}
                             for name, p in parts.items()])
    out: list[tuple] = [
        ("h", 1, f"peftbench report: {meta['title']}"),
        ("p", f"{len(runs)} runs of {len(parts)} studies in `{meta['store']}`. Runs of different studies are never "
              "pooled, even when they share model, dataset and arm label (their data or training settings may "
              "differ): each study has its own section below, with its own nuisance choice, tables and verdicts. "
              "`peftbench report STORE --study NAME` reports one study; `peftbench compare` puts studies side by "
              "side."),
        ("table", overview)]
    for i, (name, part) in enumerate(parts.items()):
        mine = {key: items for (j, key), items in figs.items() if j == i}
        out.append(("h", 2, f"Study `{_study_label(name)}`"))
        out += [("h", b[1] + 1, b[2]) if b[0] == "h" else b
                for b in document.blocks(part, mine, {**meta, "title": _study_label(name)})[1:]]
    return out


def _check_report_folder(out: Path) -> None:
    """The report replaces ``out`` as a whole: refuse a file, or a non-empty folder that is not a report."""
    from peftbench.config import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: report folder is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.md").is_file():
        raise ConfigError(f"{out}: not a report folder (no report.md) and not empty; choose a new or empty folder "
                          "for --out")

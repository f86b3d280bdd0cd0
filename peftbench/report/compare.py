"""Studies or stores side by side: the same arms on different datasets or models, in one report.

Each argument of ``peftbench compare`` (a store folder or a study file) is analysed exactly as ``peftbench report``
analyses it (:func:`peftbench.report.study_analysis`: its own [report] settings, nuisance choice, reference, margin and
verdicts); every study × model × dataset group of it becomes one **column group**. Nothing is pooled across column
groups: the comparison only lays their arm tables and verdicts side by side, rows matched by arm label.

Example::

    >>> from peftbench.report.compare import write_comparison
    >>> write_comparison(["runs-sst2", "studies/imdb.toml"], "comparison")   # doctest: +SKIP
    PosixPath('comparison')

or ``peftbench compare runs-sst2 studies/imdb.toml --out comparison``: ``report.md``, ``report.html`` and
``comparison.csv`` (one row per column group × arm).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from peftbench.report import (_check_report_folder, _study_label, document, render,
                              report_target, study_analysis, tables)
from peftbench.store import Store, fresh_sibling, swap_in

ABSENT = "—"  # an arm the column group does not have


def column_groups(targets: list[str | Path], overrides: list[str] | None = None,
                  store: str | Path | None = None) -> list[dict[str, Any]]:
    """One entry per study × model × dataset group of every target: ``label`` (unique, as short as it can be),
    ``target``, ``store``, ``study``, ``model``, ``dataset``, ``settings`` (its [report] settings) and ``group`` (the
    group of :func:`peftbench.report.analyse`: its arm table, reference and verdicts). A target that is neither a
    study file nor a store folder with finished runs is a one-line ConfigError."""
    from peftbench.config import ConfigError

    out = []
    for target in targets:
        path = Path(target)
        if not path.is_file() and not (path.is_dir() and Store(path).run_ids()):
            raise ConfigError(f"{target}: neither a study file (.toml / .yaml) nor a store folder with finished runs")
        root, run_ids, study, record = report_target(path, overrides, store)
        analysis = study_analysis(root, run_ids, study, record)
        out += [{"target": str(target), "store": str(root), "study": g["study"], "model": g["model"],
                 "dataset": g["dataset"], "settings": analysis["settings"], "group": g} for g in analysis["groups"]]
    if not out:
        raise ConfigError(f"{', '.join(map(str, targets))}: no successful runs to compare")
    for col, label in zip(out, _labels(out)):
        col["label"] = label
    return out


def _labels(cols: list[dict[str, Any]]) -> list[str]:
    """The study name; with the dataset and model when study names repeat; with the store folder when those repeat
    too; numbered as a last resort."""
    levels = [[_study_label(c["study"]), f"{c['dataset']} · {c['model']}", Path(c["store"]).name] for c in cols]
    labels = [parts[0] for parts in levels]
    for k in (2, 3):
        repeated = {label for label in labels if labels.count(label) > 1}
        labels = [" · ".join(parts[:k]) if label in repeated else label for label, parts in zip(labels, levels)]
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label} #{i + 1}" if label in repeated else label for i, label in enumerate(labels)]


def side_by_side(cols: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per column group × arm: the headline metric's mean, std and 95% CI over seeds and test examples
    (fractions, as in results.csv) and the verdict against that group's reference (Δ and its interval in points, as in
    the report's verdicts; ``verdict`` = "reference" for the reference arm itself)."""
    rows = []
    for col in cols:
        g, metric = col["group"], col["settings"]["metric"]
        verdicts = g["verdicts"].set_index("arm") if len(g["verdicts"]) else pd.DataFrame()
        for _, arm in g["table"].iterrows():
            v = verdicts.loc[arm["arm"]] if arm["arm"] in verdicts.index else pd.Series(dtype=object)
            rows.append({
                "column": col["label"], "target": col["target"], "store": col["store"], "study": col["study"],
                "model": col["model"], "dataset": col["dataset"], "arm": arm["arm"], "method": arm["method"],
                "r": arm["r"], "seeds": arm["seeds"], "params_trainable_pct": arm["params_trainable_pct"],
                "metric": metric, "mean": arm[metric], "std": arm[f"{metric}_std"],
                "ci_low": arm[f"{metric}_ci_low"], "ci_high": arm[f"{metric}_ci_high"],
                "ci_method": arm.get("ci_method"), "reference": g["reference"],
                "margin": float(col["settings"]["margin"]),
                "diff_points": v.get("diff_points"), "diff_ci_low": v.get("ci_low"), "diff_ci_high": v.get("ci_high"),
                "verdict": "reference" if arm["arm"] == g["reference"] else v.get("verdict")})
    return pd.DataFrame(rows)


def arm_order(long: pd.DataFrame) -> list[str]:
    """Every arm label of the comparison once, in the report's order (baselines first, by rank, full last)."""
    arms = long[["arm", "method", "r"]].assign(study="", model="", dataset="")
    return list(dict.fromkeys(tables.ordered(arms)["arm"]))


def _verdict_cell(row: pd.Series) -> str:
    if render.missing(row["verdict"]):
        return render.NA
    if render.missing(row["diff_points"]):
        return str(row["verdict"])
    return (f"{row['verdict']}, {render.signed(row['diff_points'])} [{render.signed(row['diff_ci_low'])}, "
            f"{render.signed(row['diff_ci_high'])}]")


def wide_display(long: pd.DataFrame, cols: list[dict[str, Any]]) -> pd.DataFrame:
    """The side-by-side table for people: one row per arm; per column group, the headline metric in points as
    mean ± std [95% CI] and the verdict vs that group's reference with Δ [its CI] in points."""
    out = pd.DataFrame({"Arm": arm_order(long)})
    for col in cols:
        mine = long[long["column"] == col["label"]].set_index("arm")
        metric, ref = col["settings"]["metric"], col["group"]["reference"]
        cells = {a: render.mean_std(pd.Series({metric: r["mean"], f"{metric}_std": r["std"],
                                               f"{metric}_ci_low": r["ci_low"], f"{metric}_ci_high": r["ci_high"]}),
                                    metric) for a, r in mine.iterrows()}
        out[f"{col['label']}: {metric}"] = [cells.get(a, ABSENT) for a in out["Arm"]]
        verdicts = {a: _verdict_cell(r) for a, r in mine.iterrows()}
        out[f"{col['label']}: vs {ref or 'reference'}"] = [verdicts.get(a, ABSENT) for a in out["Arm"]]
    return out


def blocks(cols: list[dict[str, Any]], long: pd.DataFrame) -> list[tuple]:
    """The comparison as report blocks (:mod:`peftbench.report.render`)."""
    legend = pd.DataFrame([{
        "Column": c["label"], "Argument": c["target"], "Store": c["store"], "Study": _study_label(c["study"]),
        "Model": c["model"], "Dataset": c["dataset"], "Reference": c["group"]["reference"] or render.NA,
        "Metric": c["settings"]["metric"], "Margin (pts)": f"{float(c['settings']['margin']):g}",
        "Arms": str(len(c["group"]["table"]))} for c in cols])
    out: list[tuple] = [
        ("h", 1, "peftbench comparison"),
        ("p", f"{len(cols)} column groups side by side, one per study × model × dataset. Each is analysed on its own "
              "exactly as `peftbench report` does (its own nuisance choice on validation, reference arm, margin and "
              "verdicts): nothing is pooled across them; rows are matched by arm label."),
        ("table", legend),
        ("h", 2, "Side by side"),
        ("table", wide_display(long, cols)),
        ("p", f"Per column group: the headline test metric in points, mean ± std over seeds [95% CI covering seeds "
              f"and test-set sampling], and the verdict against that group's reference with Δ = arm − reference "
              f"[its interval] in points; {ABSENT} = the arm is not in that group. Every number: "
              "[comparison.csv](comparison.csv)."),
        ("h", 2, "Verdicts per study")]
    for c in cols:
        out.append(("h", 3, c["label"]))
        v = c["group"]["verdicts"]
        if len(v):
            out.append(("list", [document.verdict_line(row) for _, row in v.iterrows()]))
            out.append(("table", document.verdict_display(v)))
        else:
            out.append(("p", f"No verdict: no reference arm `{c['settings']['reference']}` among its successful "
                             "runs."))
    return out


def write_comparison(targets: list[str | Path], out_dir: str | Path, overrides: list[str] | None = None,
                     store: str | Path | None = None) -> Path:
    """Write the comparison of ``targets`` (store folders or study files) into ``out_dir`` and return it:
    ``report.md``, ``report.html`` (self-contained) and ``comparison.csv`` (:func:`side_by_side`). Like a report, the
    folder is built aside and swapped in whole; it must be new, empty or an earlier report."""
    out = Path(out_dir)
    _check_report_folder(out)
    cols = column_groups(targets, overrides, store)
    long = side_by_side(cols)
    page = blocks(cols, long)
    final, out = out, fresh_sibling(out)
    try:
        long.to_csv(out / "comparison.csv", index=False)
        files = {"comparison.csv": (out / "comparison.csv").read_bytes()}  # embedded: the page can be shared alone
        (out / "report.md").write_text(render.markdown(page, set(files) | {"report.html"}), encoding="utf-8")
        (out / "report.html").write_text(render.html_page(page, "peftbench comparison", files), encoding="utf-8")
        swap_in(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final

"""The report as a document: display tables (numbers formatted for people) and the list of blocks that
:mod:`peftbench.report.render` turns into Markdown and HTML. Pure.

Example::

    >>> import pandas as pd
    >>> from peftbench.report.document import verdict_line
    >>> v = pd.Series({"arm": "lora r=4", "reference": "full", "trainable_pct": 0.17, "diff_points": -0.4,
    ...                "ci_low": -0.9, "ci_high": 0.1, "mcnemar_p": 0.2, "noise": 0.3, "verdict": "non-inferior",
    ...                "metric": "accuracy", "reason": "…"})
    >>> verdict_line(v)[:61]
    '**lora r=4** (0.17% of the base model trainable) vs **full**:'
    >>> verdict_line(v)[-68:]
    '[−0.90, +0.10], McNemar p = 0.2, seed std 0.30 → **non-inferior**: …'
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from peftbench.report import render, verdict
from peftbench.report.render import NA, count, mean_std, missing, num, pts, signed, size


def group_key(group: dict[str, Any]) -> str:
    return f"{group['dataset']} · {group['model']}"


def _single(table: pd.DataFrame) -> bool:
    return table[["model", "dataset"]].drop_duplicates().shape[0] <= 1


def _pct(x: Any) -> str:
    return NA if missing(x) else f"{float(x):.3g}%"


def arm_display(table: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """The arm table for people: metrics in points as mean ± std [95% CI], parameters with their share of the base
    model, costs. Model and dataset columns only when the report has several."""
    out = pd.DataFrame()
    if not _single(table):
        out["Model"] = table["model"]
        out["Dataset"] = table["dataset"]
    out["Arm"] = table["arm"]
    out["Seeds"] = table["seeds"].astype(int).astype(str)
    out["Setting (picked on val)"] = table["setting"]
    out["Trainable params"] = [NA if missing(t) else f"{count(t)} (adapter {count(a)}, head {count(h)})"
                               for t, a, h in zip(table["params_trainable"], table["params_adapter"],
                                                  table["params_head"])]
    out["% of base"] = [_pct(x) for x in table["params_trainable_pct"]]
    names = {"accuracy": "Accuracy", "f1_weighted": "F1 weighted", "f1_macro": "F1 macro",
             "precision_macro": "Precision macro", "recall_macro": "Recall macro", "roc_auc": "ROC-AUC"}
    for m, name in names.items():
        out[name] = [mean_std(row, m, with_ci=(m == metric)) for _, row in table.iterrows()]
    out["Train time (s)"] = [num(t) + ("" if missing(s) else f" ± {num(s)}")
                             for t, s in zip(table["train_time_s"], table["train_time_s_std"])]
    out["Examples/s"] = [num(x) for x in table["train_examples_per_s"]]
    out["Peak memory (MB)"] = [num(x, 0) for x in table["peak_memory_mb"]]
    out["Adapter size"] = [size(x) for x in table["adapter_size_bytes"]]
    if "invalid" in table and table["invalid"].notna().any():  # llm arms: replies that named no label
        out["Invalid predictions"] = [NA if missing(x) else num(x, 0 if float(x).is_integer() else 1)
                                      for x in table["invalid"]]
    return out


def nuisance_display(scores: pd.DataFrame, selection_metric: str) -> pd.DataFrame:
    where = {} if _single(scores) else {"Model": scores["model"], "Dataset": scores["dataset"]}
    return pd.DataFrame({**where, "Arm": scores["arm"], "Setting": scores["setting"],
                         "Seeds": scores["seeds"].astype(str),
                         f"Val {selection_metric} (mean)": [pts(v) if selection_metric != "loss" else num(v, 4)
                                                            for v in scores["val_score"]],
                         "Chosen": ["✓" if c else "" for c in scores["chosen"]]})


def efficiency_display(eff: pd.DataFrame, metric: str) -> pd.DataFrame:
    return pd.DataFrame({"Arm": eff["arm"], "Reference": eff["reference"],
                         f"Δ {metric} (points)": [signed(x) for x in eff[f"{metric}_diff_points"]],
                         "Training-time saving": [_pct(x) for x in eff["time_saving_pct"]],
                         "Parameter reduction": [_pct(x) for x in eff["param_reduction_pct"]],
                         "Memory saving": [_pct(x) for x in eff["memory_saving_pct"]]})


def verdict_line(v: pd.Series) -> str:
    head = f"**{v['arm']}**"
    if not missing(v.get("trainable_pct")):
        head += f" ({float(v['trainable_pct']):.3g}% of the base model trainable)"
    head += f" vs **{v['reference']}**"
    if missing(v.get("diff_points")):
        return f"{head}: **{v['verdict']}** ({v.get('reason', '')})"
    noise = "unknown" if missing(v.get("noise")) else f"{float(v['noise']):.2f}"
    return (f"{head}: {signed(v['diff_points'])} {v['metric']} points, 95% CI [{signed(v['ci_low'])}, "
            f"{signed(v['ci_high'])}], McNemar p = {float(v['mcnemar_p']):.2g}, seed std {noise} → "
            f"**{v['verdict']}**: {v.get('reason', '')}")


def verdict_display(verdicts: pd.DataFrame) -> pd.DataFrame:
    v = verdicts
    get = lambda col: v[col] if col in v else pd.Series([None] * len(v))  # noqa: E731
    return pd.DataFrame({
        "Arm": v["arm"], "Reference": v["reference"], "Seeds paired": get("seeds"), "Test examples": get("n_examples"),
        "Reference (pts)": [num(x, 2) for x in get("reference_score")],
        "Arm (pts)": [num(x, 2) for x in get("candidate_score")],
        "Δ (pts)": [signed(x) for x in get("diff_points")],
        "95% CI of Δ": [NA if missing(a) else f"[{signed(a)}, {signed(b)}]" for a, b in zip(get("ci_low"),
                                                                                        get("ci_high"))],
        "Only ref right / only arm right": [NA if missing(b) else f"{int(b)} / {int(c)}"
                                             for b, c in zip(get("ref_only_right"), get("cand_only_right"))],
        "McNemar p": [NA if missing(p) else f"{float(p):.3g}" for p in get("mcnemar_p")],
        "Seed std ref / arm": [f"{num(a, 2)} / {num(b, 2)}" for a, b in zip(get("seed_std_reference"),
                                                                           get("seed_std_candidate"))],
        "Verdict": v["verdict"]})


def _text(x: Any, limit: int = 160) -> str:
    text = "" if missing(x) else " ".join(str(x).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def blocks(analysis: dict[str, Any], figs: dict[str, list[tuple[str, bytes, str]]],
           meta: dict[str, Any]) -> list[tuple]:
    """The whole report as blocks (see :mod:`peftbench.report.render`)."""
    s = analysis["settings"]
    metric, margin, reference = s["metric"], float(s["margin"]), s["reference"]
    runs, table = analysis["runs"], analysis["table"]
    n_ok = int((runs["status"] == "success").sum()) if len(runs) else 0
    out: list[tuple] = [("h", 1, f"peftbench report: {meta['title']}")]
    if meta.get("question"):
        out.append(("p", meta["question"]))
    out.append(("p", f"{len(runs)} runs in `{meta['store']}` ({n_ok} succeeded, {len(runs) - n_ok} failed), "
                     f"{len(table)} arms. Headline metric: test {metric}. The nuisance setting (learning rate, "
                     f"scheduler, …) of each arm is picked by mean validation {s['selection_metric']} over seeds, "
                     f"never by test. Reference arm: `{reference}`; non-inferiority margin: {margin:g} "
                     f"point{'' if margin == 1 else 's'}."))
    if meta.get("not_run"):
        out.append(("p", f"**{meta['not_run']} run(s) of the study are not in the store yet**: the tables cover the "
                         f"finished ones only."))
    if len(table) and _single(table):
        out.append(("p", f"Model `{table['model'].iloc[0]}`, dataset `{table['dataset'].iloc[0]}`."))

    out.append(("h", 2, f"Verdict: is each arm non-inferior to `{reference}`?"))
    if reference == "full":
        out.append(("p", "Study question: does LoRA at ~1–2% of the parameters match full fine-tuning?"))
    v = analysis["verdicts"]
    if len(v):
        order = v.assign(_lora=(v["method"] != "lora")).sort_values("_lora", kind="stable")
        out.append(("list", [verdict_line(row) for _, row in order.iterrows()]))
        out.append(("table", verdict_display(v)))
        paired = v["metric"].dropna().iloc[0] if "metric" in v and v["metric"].notna().any() else metric
        out.append(("p", " ".join([
            f"Δ = arm − reference in points of test {paired}, seeds pooled (seed s of the arm paired with seed s of",
            "the reference, on the same test examples). 95% CI: paired bootstrap over test examples. McNemar: exact",
            "binomial test on the examples only one arm got right. A verdict needs at least 2 seeds per arm. The",
            "decision interval is the CI widened to at least Δ ± the seeds' standard error",
            f"(sqrt((std_ref² + std_arm²) / seeds)): **non-inferior** if its low end is above −{margin:g};",
            f"**inferior** if its high end is below −{margin:g} and |Δ| exceeds the larger seed std (a difference",
            f"smaller than the seed noise is never claimed); otherwise **{verdict.INCONCLUSIVE}**.",
            "Details: docs/report.md."])))
    else:
        missing_ref = len(table) and all(g["reference"] is None for g in analysis["groups"])
        out.append(("p", f"No verdict: no arm labelled or of method `{reference}` among the successful runs."
                    if missing_ref else "No verdict: no arm to compare."))

    out.append(("h", 2, "Results per arm"))
    if len(table):
        out.append(("table", arm_display(table, metric)))
        out.append(("p", f"Test scores in points (% of test examples for accuracy): mean ± std over seeds; for "
                         f"{metric} also the 95% CI of the mean (percentile bootstrap over seeds with 5 or more "
                         f"seeds, Student t with 2–4, none with 1). Costs are means over seeds; n/a = not applicable "
                         f"or not recorded. All columns: [results.csv](results.csv), [results.json](results.json); "
                         f"LaTeX: [table.tex](table.tex); every run: [runs.csv](runs.csv)."))
    else:
        out.append(("p", "No successful runs."))
    if len(analysis["nuisance"]):
        out.append(("h", 3, "Nuisance settings (picked on validation, never on test)"))
        out.append(("table", nuisance_display(analysis["nuisance"], s["selection_metric"])))

    eff = analysis["efficiency"]
    out.append(("h", 2, f"Efficiency vs `{reference}`"))
    if len(eff):
        out.append(("table", efficiency_display(eff, metric)))
        out.append(("p", "Δ = arm − reference (points). Savings = 1 − arm / reference (positive: the arm needs "
                         "less training time, fewer trainable parameters, less peak memory). Peak memory is what the "
                         "run recorded (`peak_memory_kind`: process RSS on CPU, CUDA max allocated on GPU)."))
    else:
        out.append(("p", f"No reference arm `{reference}` among the successful runs."))

    several = len(analysis["groups"]) > 1
    if figs and any(figs.values()):
        out.append(("h", 2, "Plots"))
        for g in analysis["groups"]:
            if several:
                out.append(("h", 3, group_key(g)))
            for path, data, caption in figs.get(group_key(g), []):
                out.append(("p", f"**{caption}**"))
                out.append(("img", path, data, caption))

    spectra = [g for g in analysis["groups"] if g.get("spectra")]
    if spectra:
        from peftbench.spectrum import spectrum_sentences, spectrum_table

        out.append(("h", 2, "Where the rank goes: spectrum of the learned updates"))
        out.append(("p", "For each adapted matrix, the singular values of the learned update ΔW (B·A·scale for LoRA, "
                         "W_finetuned − W_pretrained for full fine-tuning, on the same matrices). Effective rank = "
                         "smallest k holding 90% of ‖ΔW‖²; stable rank = ‖ΔW‖²_F / σ₁². Details: docs/methods.md."))
        for g in spectra:
            if several:
                out.append(("h", 3, group_key(g)))
            out.append(("list", spectrum_sentences(g["spectra"], reference)))
            out.append(("table", spectrum_table(g["spectra"]).round(3)))

    out.append(("h", 2, "Error analysis"))
    for g in analysis["groups"]:
        level = 3
        if several:
            out.append(("h", 3, group_key(g)))
            level = 4
        out += _error_blocks(g, level)

    out.append(("h", 2, "Failed runs"))
    failed = analysis["failed"]
    if len(failed):
        out.append(("table", pd.DataFrame({"Run": failed["run_id"], "Arm": failed["arm"], "Dataset": failed["dataset"],
                                           "lr": failed["lr"], "Seed": failed["seed"], "Status": failed["status"],
                                           "Error": [_text(e, 300) for e in failed["error"]]})))
        out.append(("p", "Failed runs are left out of every table above. Re-run the study to retry them."))
    else:
        out.append(("p", "None."))

    checks = analysis["checks"]
    out.append(("h", 2, "Checks"))
    items = []
    if len(checks):
        ok = int(checks["match"].sum())
        items.append(f"Test accuracy recomputed from predictions.parquet equals result.json for {ok} of "
                     f"{len(checks)} runs" + ("." if ok == len(checks) else
                                              f"; mismatches: {', '.join(checks.loc[~checks['match'], 'run_id'])}."))
    no_preds = n_ok - len(checks)
    if no_preds > 0:
        items.append(f"{no_preds} successful run(s) have no predictions.parquet: they are in the tables but not in "
                     f"the verdict or the error analysis.")
    items.append("Files: [report.html](report.html) (self-contained), [results.csv](results.csv), "
                 "[results.json](results.json), [runs.csv](runs.csv), [table.md](table.md), [table.tex](table.tex), "
                 "plots/.")
    out.append(("list", items))
    return out


def _error_blocks(g: dict[str, Any], level: int) -> list[tuple]:
    out: list[tuple] = []
    by_length = g["by_length"]
    out.append(("h", level, "Error rate by text length"))
    if len(by_length):
        shown = by_length.copy()
        for col in shown.columns[2:]:
            shown[col] = [pts(x, 1) for x in shown[col]]
        shown = shown.rename(columns={"bucket": "Length (words, quantile buckets)", "n": "Test examples"})
        out.append(("table", shown))
        out.append(("p", "Error rate in % of the bucket's test examples, seeds pooled."))
    else:
        out.append(("p", "No stored predictions."))
    best = g["best"]
    if g["per_class"] is not None:
        out.append(("h", level, f"Per-class metrics of the best arm, {best}"))
        pc = g["per_class"]
        out.append(("table", pd.DataFrame({"Class": pc["label"], "Precision": [pts(x) for x in pc["precision"]],
                                           "Recall": [pts(x) for x in pc["recall"]],
                                           "F1": [pts(x) for x in pc["f1"]],
                                           "Support (all seeds)": pc["support"].astype(str)})))
    if g["mistakes"] is not None:
        out.append(("h", level, f"Most confident mistakes of {best}"))
        m = g["mistakes"]
        if len(m):
            out.append(("table", pd.DataFrame({"id": m["id"].astype(str), "Seed": m["seed"].astype(str),
                                               "Text": [_text(t) for t in m["text"]], "Gold": m["gold"],
                                               "Predicted": m["predicted"],
                                               "Confidence": [pts(c, 1) for c in m["confidence"]]})))
        else:
            out.append(("p", "No mistakes."))
    if g["pair"] is not None:
        a, b = g["pair"]
        c = g["disagree_counts"]
        out.append(("h", level, f"Where {a} and {b} disagree"))
        out.append(("p", f"Of {c['examples']} test examples, {c['a_right_b_wrong']} are right under {a} and wrong "
                         f"under {b}, and {c['b_right_a_wrong']} the other way round (right/wrong = in most seeds)."))
        d = g["disagree"]
        if len(d):
            out.append(("table", pd.DataFrame({"id": d["id"].astype(str),
                                               "Right under": [a if w == "A" else b for w in d["right_under"]],
                                               "Text": [_text(t) for t in d["text"]], "Gold": d["gold"],
                                               f"{a}: seeds right": [pts(x, 0) + "%" for x in d["a_right"]],
                                               f"{b}: seeds right": [pts(x, 0) + "%" for x in d["b_right"]]})))
    return out


def results_json(analysis: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything in the report as JSON (fractions for metrics in tables, points in verdicts and efficiency)."""
    groups = []
    for g in analysis["groups"]:
        groups.append({"model": g["model"], "dataset": g["dataset"], "reference": g["reference"], "best_arm": g["best"],
                       "labels": g["labels"], "error_by_length": render.records(g["by_length"]),
                       "per_class_best_arm": render.records(g["per_class"]) if g["per_class"] is not None else [],
                       "confident_mistakes": render.records(g["mistakes"]) if g["mistakes"] is not None else [],
                       "disagreement": None if g["pair"] is None else
                       {"a": g["pair"][0], "b": g["pair"][1], **g["disagree_counts"],
                        "examples_listed": render.records(g["disagree"])},
                       "confusion_matrix_best_arm": None if g["confusion"] is None else
                       [[int(x) for x in row] for row in g["confusion"]]})
    return {"title": meta["title"], "store": meta["store"], "settings": render.jsonable(analysis["settings"]),
            "arms": render.records(analysis["table"]), "nuisance": render.records(analysis["nuisance"]),
            "efficiency": render.records(analysis["efficiency"]), "verdicts": render.records(analysis["verdicts"]),
            "groups": groups, "failed_runs": render.records(analysis["failed"]),
            "checks": render.records(analysis["checks"])}

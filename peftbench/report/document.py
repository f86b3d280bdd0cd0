"""The report as a document: display tables (numbers formatted for people) and the list of blocks that
:mod:`peftbench.report.render` turns into Markdown and HTML. Pure.

Example::

    >>> import pandas as pd
    >>> from peftbench.report.document import verdict_line
    >>> v = pd.Series({"arm": "lora r=4", "reference": "full", "trainable_pct": 0.17, "diff_points": -0.4,
    ...                "ci_low": -0.9, "ci_high": 0.1, "alpha": 0.025, "seeds": 5, "seeds_reference": 5,
    ...                "n_examples": 5000, "verdict": "non-inferior", "metric": "accuracy", "reason": "…"})
    >>> verdict_line(v)[:61]
    '**lora r=4** (0.17% of the base model trainable) vs **full**:'
    >>> verdict_line(v)[-75:]
    '95% CI [−0.90, +0.10] (5 / 5 seeds, 5,000 test examples) → **non-inferior**'
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from peftbench.report import errors, render, verdict
from peftbench.report.render import NA, count, mean_std, missing, num, pts, signed, size


def group_key(group: dict[str, Any]) -> str:
    return f"{group['dataset']} · {group['model']}"


def _single(table: pd.DataFrame) -> bool:
    return table[["model", "dataset"]].drop_duplicates().shape[0] <= 1


def _pct(x: Any) -> str:
    """A percentage with 3 significant digits, never rounded up to 100% (99.96 → '99.96%')."""
    if missing(x):
        return NA
    x = float(x)
    text = f"{x:.3g}"
    digits = 2
    while x < 100 and float(text) >= 100 and digits < 8:
        text = f"{x:.{digits}f}"
        digits += 1
    return f"{text}%"


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
    out["% trainable"] = [_pct(x) for x in table["params_trainable_pct"]]
    names = {"accuracy": "Accuracy", "f1_weighted": "F1 weighted", "f1_macro": "F1 macro",
             "precision_macro": "Precision macro", "recall_macro": "Recall macro", "roc_auc": "ROC-AUC"}
    for m, name in names.items():
        out[name] = [mean_std(row, m, with_ci=(m == metric)) for _, row in table.iterrows()]
    out["Train time (s)"] = [num(t) + ("" if missing(s) else f" ± {num(s)}")
                             for t, s in zip(table["train_time_s"], table["train_time_s_std"])]
    out["Examples/s"] = [num(x) for x in table["train_examples_per_s"]]
    if "train_flops_per_s" in table and table["train_flops_per_s"].notna().any():  # peftbench.flops: model FLOPs
        out["Train GFLOP/s"] = [num(x / 1e9) for x in table["train_flops_per_s"]]
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


def _where(frame: pd.DataFrame) -> dict[str, Any]:
    """Dataset and model columns for a table of a report with several (nothing for one)."""
    return {} if _single(frame) else {"Dataset": frame["dataset"], "Model": frame["model"]}


def efficiency_display(eff: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The efficiency table; an llm arm's estimated request cost as a column when some arm recorded one."""
    out = pd.DataFrame({**_where(eff), "Arm": eff["arm"], "Reference": eff["reference"],
                        f"Δ {metric} (points)": [signed(x) for x in eff[f"{metric}_diff_points"]],
                        "Training-time saving": [_pct(x) for x in eff["time_saving_pct"]],
                        "Parameter reduction": [_pct(x) for x in eff["param_reduction_pct"]],
                        "Memory saving": [_pct(x) for x in eff["memory_saving_pct"]]})
    cost = eff["estimated_cost_usd"] if "estimated_cost_usd" in eff else pd.Series(dtype=float)
    if pd.to_numeric(cost, errors="coerce").notna().any():
        out["LLM cost (USD, estimated)"] = [NA if missing(x) else f"${float(x):,.4f}" for x in cost]
    return out


def verdict_line(v: pd.Series, where: bool = False) -> str:
    """One sentence per verdict: Δ, its interval (what it covers), seeds and test examples, the verdict; ``where``:
    led by the comparison's dataset and model (a report with several)."""
    head = f"`{v['dataset']}` · `{v['model']}`: " if where else ""
    head += f"**{v['arm']}**"
    if not missing(v.get("trainable_pct")):
        head += f" ({_pct(v['trainable_pct'])} of the base model trainable)"
    head += f" vs **{v['reference']}**"
    if missing(v.get("diff_points")):
        return f"{head}: **{v['verdict']}** ({v.get('reason', '')})"
    level = f"{100 * (1 - 2 * float(v.get('alpha', verdict.ALPHA))):.3g}% CI"
    look = f", decided at look {int(v['look'])}" if not missing(v.get("look")) else ""
    return (f"{head}: {signed(v['diff_points'])} {v['metric']} points, {level} [{signed(v['ci_low'])}, "
            f"{signed(v['ci_high'])}] ({int(v['seeds'])} / {int(v['seeds_reference'])} seeds, "
            f"{int(v['n_examples']):,} test examples{look}) → **{v['verdict']}**")


def _comparison_columns(v: pd.DataFrame, seeds: str, examples: str) -> tuple[Any, dict[str, Any]]:
    """A column getter (missing columns read as empty) and the leading columns of a table of comparisons: dataset
    and model when there are several, arm, reference, seeds of both arms, test examples."""
    def get(col):
        return v[col] if col in v else pd.Series([None] * len(v), index=v.index)

    return get, {**_where(v), "Arm": v["arm"], "Reference": v["reference"],
                 seeds: [NA if missing(a) else f"{int(a)} / {int(b)}" for a, b in zip(get("seeds"),
                                                                                   get("seeds_reference"))],
                 examples: [count(x) for x in get("n_examples")]}


def verdict_display(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The verdict table: every number behind each verdict."""
    get, head = _comparison_columns(verdicts, "Seeds arm / ref", "Test examples")
    return pd.DataFrame({
        **head,
        "Reference (pts)": [num(x, 2) for x in get("reference_score")],
        "Arm (pts)": [num(x, 2) for x in get("candidate_score")],
        "Δ (pts)": [signed(x) for x in get("diff_points")],
        "CI of Δ": [NA if missing(a) else f"[{signed(a)}, {signed(b)}]" for a, b in zip(get("ci_low"),
                                                                                    get("ci_high"))],
        "SE: seeds / test": [NA if missing(a) else f"{num(a, 2)} / {num(b, 2)}"
                             for a, b in zip(get("seed_se_points"), get("test_se_points"))],
        "df": [num(x, 1) for x in get("df")],
        "p non-inf. / inferior": [NA if missing(a) else f"{float(a):.2g} / {float(b):.2g}"
                                  for a, b in zip(get("p_noninferior"), get("p_inferior"))],
        "p decisive (Holm)": [NA if missing(p) else f"{float(p):.2g}" for p in get("p_decision_holm")],
        "McNemar p per seed": [NA if missing(p) else str(p) for p in get("mcnemar_p_per_seed")],
        "Verdict": verdicts["verdict"]})


def plan_display(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Planning table of the undecided comparisons: what would decide each with 80% power."""
    v = verdicts[verdicts["verdict"] == verdict.UNDECIDED] if len(verdicts) else verdicts
    get, head = _comparison_columns(v, "Seeds now", "Test examples now")
    table = pd.DataFrame({
        **head, "Δ (pts)": [signed(x) for x in get("diff_points")],
        "Seeds needed (this test set)": [count(x) if not missing(x) else "more seeds cannot decide"
                                         for x in get("seeds_needed")],
        "Test examples needed (these seeds)": [count(x) if not missing(x) else "a larger test set cannot decide"
                                               for x in get("test_examples_needed")],
        "Bottleneck": get("bottleneck")})
    first = [c for c in table.columns if c not in ("Δ (pts)", "Seeds now", "Test examples now")][:-3]
    return table[first + ["Δ (pts)", "Seeds now", "Test examples now"] + list(table.columns[-3:])]


def study_question(analysis: dict[str, Any], meta: dict[str, Any]) -> str:
    """The study's own question (its ``description``), else one written from the arms' actual parameter shares."""
    if meta.get("question"):
        return meta["question"]
    s = analysis["settings"]
    table = analysis["table"]
    shares = list(dict.fromkeys(f"{a} ({_pct(p)})" for a, p in zip(table["arm"], table["params_trainable_pct"])
                                if a != s["reference"] and not missing(p))) if len(table) else []
    arms = ", ".join(shares) if shares else "each arm"
    return (f"Study question: does {arms} match `{s['reference']}` within {float(s['margin']):g} point(s) of test "
            f"{s['metric']}? (Percentages: trainable parameters / all parameters of the trained model.)")


def _method_paragraph(metric: str, margin: float, alpha: float, sequential: dict | None) -> str:
    level = f"{100 * (1 - 2 * alpha):.3g}%"
    text = [
        f"Δ = arm − reference in points of test {metric}: the mean over the arm's seeds minus the mean over the",
        "reference's seeds, on the test examples every run has. Its interval covers **both** sources of variance:",
        "the training seed (the replication unit) and test-set sampling — a crossed examples × seeds",
        "variance-components estimate with a Student t quantile (Satterthwaite df), so 3 seeds give a wide",
        f"interval. **superior** if the {level} interval's lower bound is above 0, **non-inferior** if it is above",
        f"−{margin:g}, **inferior** if its upper bound is below −{margin:g}, else **{verdict.UNDECIDED}**; the",
        "decisive one-sided p-value (the smaller of non-inferior and inferior) is Holm-adjusted over the arms",
        "compared with the reference, claims in its direction. McNemar per seed is descriptive only. A verdict",
        "needs ≥ 2 seeds per arm."]
    if sequential:
        text.append(f"Seeds were added adaptively (`--until-decided`, looks at {sequential['schedule']} seeds per "
                    f"arm): each look's level is its share of the one-sided α = {verdict.ALPHA} spent by a "
                    f"Pocock-type Lan–DeMets function, so the overall error rate stays ≤ {verdict.ALPHA}; an arm "
                    "decided at a look keeps that look's verdict.")
    text.append("Method and references: [docs/report.md](docs/report.md) in the peftbench sources.")
    return " ".join(text)


def _text(x: Any, limit: int = 160) -> str:
    text = "" if missing(x) else " ".join(str(x).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pair_cells(frame: pd.DataFrame) -> dict[str, list[str]]:
    """A sentence pair's second text as a table column of its own (nothing for single texts)."""
    return {"Text pair": [_text(t) for t in frame["text_pair"]]} if "text_pair" in frame.columns else {}


def blocks(analysis: dict[str, Any], figs: dict[str, list[tuple[str, bytes, str]]],
           meta: dict[str, Any]) -> list[tuple]:
    """The whole report as blocks (see :mod:`peftbench.report.render`)."""
    s = analysis["settings"]
    metric, margin, reference = s["metric"], float(s["margin"]), s["reference"]
    runs, table = analysis["runs"], analysis["table"]
    n_ok = int((runs["status"] == "success").sum()) if len(runs) else 0
    out: list[tuple] = [("h", 1, f"peftbench report: {meta['title']}")]
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
    out.append(("p", study_question(analysis, meta)))
    v = analysis["verdicts"]
    if len(v):
        out.append(("list", [verdict_line(row, not _single(v)) for _, row in v.iterrows()]))
        out.append(("table", verdict_display(v)))
        paired = v["metric"].dropna().iloc[0] if "metric" in v and v["metric"].notna().any() else metric
        out.append(("p", _method_paragraph(paired, margin, float(s.get("alpha", verdict.ALPHA)),
                                           s.get("sequential"))))
        undecided = v[v["verdict"] == verdict.UNDECIDED]
        if len(undecided):
            out.append(("h", 3, "Planning: what would decide the undecided comparisons"))
            out.append(("table", plan_display(v)))
            out.append(("p", "Seeds per arm (both arms) at the current test-set size, or test examples at the "
                             "current seeds, that would give 80% power to decide (non-inferior or inferior) if the "
                             "true Δ were the observed one, at the observed variance components (`peftbench plan` "
                             "prints the same table). When the test set's own sampling error is wider than the "
                             "distance to the margin, no number of seeds can decide."))
    else:
        missing_ref = len(table) and all(g["reference"] is None for g in analysis["groups"])
        out.append(("p", f"No verdict: no arm labelled or of method `{reference}` among the successful runs."
                    if missing_ref else "No verdict: no arm to compare."))
    checks = [g["baseline_check"] for g in analysis["groups"] if g.get("baseline_check")]
    for c in checks:
        out.append(("p", f"Baselines: the majority class (`{c['majority']}`) scores {num(c['reference_score'], 2)} "
                         f"accuracy points; the untrained head (`{c['untrained']}`) {num(c['candidate_score'], 2)}, "
                         f"{signed(c['diff_points'])} points vs the majority class (95% CI [{signed(c['ci_low'])}, "
                         f"{signed(c['ci_high'])}]). Trained arms should be read against the majority class, not "
                         f"against a random head."))

    out.append(("h", 2, "Results per arm"))
    if len(table):
        out.append(("table", arm_display(table, metric)))
        out.append(("p", f"Test scores in points (% of test examples for accuracy): mean ± std over seeds; for "
                         f"{metric} also the 95% CI of the mean, covering both the seeds and test-set sampling "
                         f"(variance components, t quantile; with 1 seed: test-set sampling only — `ci_method` in "
                         f"results.csv says which). Trainable % = trainable / all parameters of the trained model "
                         f"(base + head + adapter). Costs are means over seeds; the frozen arm's training time "
                         f"includes its one encoder pass; n/a = not applicable "
                         f"or not recorded. All columns: [results.csv](results.csv), [results.json](results.json); "
                         f"LaTeX: [table.tex](table.tex); every run: [runs.csv](runs.csv)."))
    else:
        out.append(("p", "No successful runs."))
    if len(analysis["nuisance"]):
        out.append(("h", 3, "Nuisance settings (picked on validation, never on test)"))
        out.append(("table", nuisance_display(analysis["nuisance"], s["selection_metric"])))

    out += _tuning_blocks(analysis.get("tuning"), s["selection_metric"])
    out += _lr_blocks(analysis.get("lr_readout"), analysis.get("lr_grid"), s["selection_metric"])
    out += _data_blocks(analysis.get("data") or [])

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
                         "smallest k holding 90% of ‖ΔW‖²; stable rank = ‖ΔW‖²_F / σ₁². Details: "
                         "[docs/methods.md](docs/methods.md)."))
        for g in spectra:
            if several:
                out.append(("h", 3, group_key(g)))
            out.append(("list", spectrum_sentences(g["spectra"], reference)))
            out.append(("table", spectrum_table(g["spectra"]).round(3)))
        out += _intruder_blocks(spectra, several)

    out += _calibration_blocks(analysis["groups"], several)
    out += _out_of_scope_blocks(analysis["groups"], s.get("out_of_scope_label"), several)

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
    items.append("Files: [report.html](report.html) (self-contained: these files are embedded in it), "
                 "[results.csv](results.csv), [results.json](results.json), [runs.csv](runs.csv), "
                 "[per_class.csv](per_class.csv), [table.md](table.md), [table.tex](table.tex), plots/.")
    out.append(("list", items))
    return out


def _tuning_blocks(tuning: pd.DataFrame | None, selection_metric: str) -> list[tuple]:
    """Expected best validation score vs number of tuning trials per arm (shown when some arm tried several)."""
    if tuning is None or not len(tuning) or tuning["of"].max() < 2:
        return []
    wide = tuning.pivot_table(index=["dataset", "model", "arm"], columns="trials", values="expected_best",
                              sort=False)
    shown = pd.DataFrame({"Arm": [a for _, _, a in wide.index],
                          **{f"{t} trial{'s' if t > 1 else ''}": [pts(x) if selection_metric != "loss" else num(x, 4)
                                                                    for x in wide[t]] for t in wide.columns}})
    if wide.index.get_level_values(0).nunique() > 1:
        shown.insert(0, "Dataset", [d for d, _, _ in wide.index])
    out: list[tuple] = [("h", 3, "Tuning budget: expected best validation score vs trials"),
                        ("table", shown),
                        ("p", f"Expected best mean validation {selection_metric} of n nuisance settings drawn from "
                              "those each arm tried (unbiased estimator of Dodge et al. 2019/2021, 'Show your "
                              "work'): an arm that looks better only with more trials is not better.")]
    unequal = tuning[tuning["unequal_grid"]]
    if len(unequal):
        sizes = unequal.drop_duplicates(["dataset", "arm"])
        out.append(("p", "**Unequal tuning budgets**: " + ", ".join(f"`{a}` {int(n)} setting(s)" for a, n in
                                                                   zip(sizes["arm"], sizes["of"]))
                         + " — compare arms at the same number of trials (columns above)."))
    return out


def _lr_text(x: Any) -> str:
    return NA if missing(x) else f"{float(x):.3g}"


def _lr_blocks(summary: pd.DataFrame | None, grid: pd.DataFrame | None, selection_metric: str) -> list[tuple]:
    """Each arm's best learning rate (picked on validation) and its ratio to the reference's, with the validation
    score over the grid (shown when the reference and at least one other arm sweep the learning rate)."""
    if summary is None or not len(summary) or (summary["arm"] != summary["reference"]).sum() == 0:
        return []
    score = (lambda x: num(x, 4)) if selection_metric == "loss" else pts  # noqa: E731
    lines = []
    for row in summary[summary["arm"] != summary["reference"]].itertuples():
        edge = f"; at the {row.edge} lr tried, so the ratio is only a bound" if row.edge else ""
        lines.append(f"`{row.arm}`: best learning rate {_lr_text(row.best_lr)} (of {row.lrs} tried, on validation), "
                     f"{row.lr_ratio:.3g}× `{row.reference}`'s best {_lr_text(row.reference_best_lr)}{edge}.")
    lrs = sorted(grid["lr"].unique())
    rows = []
    for row in summary.itertuples():
        mine = grid[(grid["model"] == row.model) & (grid["dataset"] == row.dataset) & (grid["arm"] == row.arm)]
        by_lr = {g.lr: score(g.val_score) + (" ★" if g.best else "") for g in mine.itertuples()}
        rows.append({"Arm": row.arm, "Best lr": _lr_text(row.best_lr), f"× {row.reference}'s": f"{row.lr_ratio:.3g}×",
                     **{f"lr {_lr_text(lr)}": by_lr.get(lr, "") for lr in lrs}})
    shown = pd.DataFrame(rows)
    if not _single(summary):
        shown.insert(0, "Dataset", list(summary["dataset"]))
    return [("h", 3, "Learning rate: each arm's best against the reference's"),
            ("list", lines), ("table", shown),
            ("p", f"Best learning rate = the lr of the setting picked on mean validation {selection_metric} (the "
                  "nuisance table above); each cell is the mean validation score at that lr (other swept settings at "
                  "their best; ★ = picked). A ratio only means something when the best lr is inside the grid, not at "
                  "its end. 'LoRA Without Regret' (Schulman et al., Thinking Machines, 2025) found "
                  "LoRA's best lr ≈ 10× full fine-tuning's.")]


def _intruder_blocks(spectra: list[dict[str, Any]], several: bool) -> list[tuple]:
    """Intruder dimensions per arm (Shuttleworth et al. 2024), when the runs' spectrum.json carry them."""
    from peftbench.spectrum import INTRUDER_EPSILONS, intruder_sentences, intruder_table

    tables_ = [(g, intruder_table(g["spectra"])) for g in spectra]
    if not any(len(t) for _, t in tables_):
        return []
    out: list[tuple] = [("h", 3, "Intruder dimensions"),
                        ("p", "Per adapted matrix, the top k singular vectors u′ᵢ of the fine-tuned weight W′ = W + ΔW "
                              "are compared with all left singular vectors u_j of the pretrained W: u′ᵢ is an "
                              "intruder dimension when maxⱼ |cos(u′ᵢ, u_j)| < ε (Shuttleworth et al. 2024, 'LoRA vs "
                              "Full Fine-tuning: An Illusion of Equivalence', arXiv:2410.21228). Counts per run "
                              "are summed over its adapted matrices and averaged over runs; per matrix, averaged. "
                              "Details: [docs/methods.md](docs/methods.md).")]
    for g, table in tables_:
        if not len(table):
            continue
        if several:
            out.append(("h", 4, group_key(g)))
        out.append(("list", intruder_sentences(g["spectra"])))
        shown = pd.DataFrame({"Arm": table["arm"], "Matrices": table["matrices"].astype(str),
                              "Runs": table["runs"].astype(str), "k": table["k"].astype(str)})
        for eps in INTRUDER_EPSILONS:
            shown[f"per run, ε={eps:g}"] = [num(x, 2) for x in table[f"intruders_per_run_eps{eps:g}"]]
            shown[f"per matrix, ε={eps:g}"] = [num(x, 2) for x in table[f"intruders_per_matrix_eps{eps:g}"]]
        out.append(("table", shown))
    return out


def _data_blocks(data: list[dict[str, Any]]) -> list[tuple]:
    """Per dataset: split sizes and class shares, carved splits, duplicates and label conflicts."""
    if not data:
        return []
    out: list[tuple] = [("h", 2, "Data")]
    for d in data:
        labels = d.get("labels") or []
        rows = []
        for role in ("train", "validation", "test"):
            shares = d.get(f"{role}_class_shares") or []
            carved = d.get(f"{role}_carved_from_train")
            rows.append({"Split": role, "Examples": count(d.get(f"n_{role}")),
                         "Class shares": ", ".join(f"{labels[i] if i < len(labels) else i} {100 * x:.1f}%"
                                                   for i, x in enumerate(shares)) or NA,
                         "Carved from train": f"yes ({100 * carved:g}%)" if carved else "no",
                         "Repeated texts": count(d.get(f"{role}_duplicate_rows")),
                         "Texts with conflicting labels": count(d.get(f"{role}_conflicting_texts"))})
        out.append(("h", 3, f"Dataset `{d['dataset']}`"))
        out.append(("table", pd.DataFrame(rows)))
        dropped = sum(int(d.get(f"{r}_test_duplicates_dropped") or 0) for r in ("train", "validation"))
        out.append(("list", [
            f"{dropped} train/validation rows whose text is also in test were dropped.",
            f"{count(d.get('validation_texts_in_train'))} validation rows have a text that is also in train.",
            f"{count(d.get('conflicting_texts_all_splits'))} distinct texts carry different labels across the "
            f"splits."]))
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
    many = _n_classes(g) > errors.MANY_CLASSES
    if g["per_class"] is not None and not many:
        out.append(("h", level, f"Per-class metrics of the best arm, {best}"))
        pc = g["per_class"]
        out.append(("table", pd.DataFrame({"Class": pc["label"], "Precision": [pts(x) for x in pc["precision"]],
                                           "Recall": [pts(x) for x in pc["recall"]],
                                           "F1": [pts(x) for x in pc["f1"]],
                                           "Support (all seeds)": pc["support"].astype(str)})))
    elif g["per_class"] is not None:
        worst = errors.worst_classes(g["per_class_arms"], best)
        out.append(("h", level, f"Worst classes of the best arm, {best} ({len(worst)} of {_n_classes(g)})"))
        out.append(("table", pd.DataFrame({
            "Class": worst["label"], "Precision": [pts(x) for x in worst["precision"]],
            "Recall": [pts(x) for x in worst["recall"]], "F1": [pts(x) for x in worst["f1"]],
            "Support (all seeds)": worst["support"].astype(int).astype(str),
            **{f"F1 {c[3:]}": [pts(x) for x in worst[c]] for c in worst.columns if c.startswith("f1 ")}})))
        out.append(("p", f"The classes with the lowest F1 under {best}, with every arm's F1 on them (points, seeds "
                         "pooled)."))
    if g.get("per_class_arms") is not None and len(g["per_class_arms"]):
        out.append(("p", "Precision, recall, F1 and support of every class under every arm: "
                         "[per_class.csv](per_class.csv)."))
    top = g.get("top_confusions")
    if many and top is not None and len(top):
        out.append(("h", level, f"Top confusions of the best arm, {best}"))
        out.append(("table", pd.DataFrame({"True": top["true"], "Predicted": top["predicted"],
                                           "Count (all seeds)": top["count"].astype(str),
                                           "Share of the true class": [pts(x, 1) + "%" for x in top["share"]]})))
        out.append(("p", f"With {_n_classes(g)} classes the confusion matrix is not drawn: these are its largest "
                         "off-diagonal cells (seeds summed); share = count / the true class's test predictions."))
    if g["mistakes"] is not None:
        out.append(("h", level, f"Most confident mistakes of {best}"))
        m = g["mistakes"]
        if len(m):
            out.append(("table", pd.DataFrame({"id": m["id"].astype(str), "Seed": m["seed"].astype(str),
                                               "Text": [_text(t) for t in m["text"]], **_pair_cells(m),
                                               "Gold": m["gold"],
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
                                               "Text": [_text(t) for t in d["text"]], **_pair_cells(d),
                                               "Gold": d["gold"],
                                               f"{a}: seeds right": [pts(x, 0) + "%" for x in d["a_right"]],
                                               f"{b}: seeds right": [pts(x, 0) + "%" for x in d["b_right"]]})))
    return out


def _n_classes(g: dict[str, Any]) -> int:
    return len(g["labels"]) or (len(g["confusion"]) if g.get("confusion") is not None else 0)


def _calibration_blocks(groups: list[dict[str, Any]], several: bool) -> list[tuple]:
    """ECE per arm with probabilities (:mod:`peftbench.report.calibration`)."""
    shown = [g for g in groups if g.get("calibration") is not None and len(g["calibration"])]
    if not shown:
        return []
    out: list[tuple] = [("h", 2, "Calibration")]
    for g in shown:
        c = g["calibration"]
        if several:
            out.append(("h", 3, group_key(g)))
        out.append(("table", pd.DataFrame({
            **({"Dataset": [g["dataset"]] * len(c), "Model": [g["model"]] * len(c)} if several else {}),
            "Arm": c["arm"], "ECE (pts, seeds pooled)": [pts(x) for x in c["ece"]],
            "ECE per seed (pts)": [pts(m) + ("" if missing(sd) else f" ± {pts(sd)}")
                                   for m, sd in zip(c["ece_seed_mean"], c["ece_seed_std"])],
            "Mean confidence (pts)": [pts(x) for x in c["confidence"]],
            "Accuracy (pts)": [pts(x) for x in c["accuracy"]],
            "Predictions": [count(x) for x in c["n"]], "Seeds": c["seeds"].astype(str)})))
    out.append(("p", "Expected calibration error of the top-label confidence (the largest class probability): the "
                     "test predictions are cut into 15 equal-width confidence bins and ECE = Σ (bin share) · "
                     "|bin accuracy − bin mean confidence|, in points (Naeini et al. 2015; Guo et al. 2017, 'On "
                     "calibration of modern neural networks'); 0 = perfectly calibrated. Mean confidence above "
                     "accuracy = overconfident. Arms without probabilities (llm) are left out. The reliability "
                     "diagram is under Plots."))
    return out


def _out_of_scope_blocks(groups: list[dict[str, Any]], label: str | None, several: bool) -> list[tuple]:
    """In-scope accuracy and out-of-scope recall per arm (``report.out_of_scope_label``)."""
    if not label:
        return []
    out: list[tuple] = [("h", 2, f"Out-of-scope detection (`{label}`)")]
    for g in groups:
        t = g.get("out_of_scope")
        if several:
            out.append(("h", 3, group_key(g)))
        if t is None or not len(t):
            out.append(("p", f"`{label}` is not one of the labels of `{g['dataset']}` (or no arm has predictions)."))
            continue
        out.append(("table", pd.DataFrame({
            **({"Dataset": [g["dataset"]] * len(t), "Model": [g["model"]] * len(t)} if several else {}),
            "Arm": t["arm"], "Seeds": t["seeds"].astype(str),
            "In-scope accuracy (pts)": [pts(m) + ("" if missing(sd) else f" ± {pts(sd)}")
                                        for m, sd in zip(t["in_scope_accuracy"], t["in_scope_accuracy_std"])],
            "Out-of-scope recall (pts)": [pts(m) + ("" if missing(sd) else f" ± {pts(sd)}")
                                          for m, sd in zip(t["oos_recall"], t["oos_recall_std"])],
            "In-scope / out-of-scope test examples": [f"{count(a)} / {count(b)}"
                                                      for a, b in zip(t["n_in_scope"], t["n_oos"])]})))
    out.append(("p", f"As in Larson et al. 2019 (CLINC150, 'An evaluation dataset for intent classification and "
                     f"out-of-scope prediction'): in-scope accuracy = accuracy on the test examples whose gold class "
                     f"is not `{label}` (predicting `{label}` for one is wrong); out-of-scope recall = share of the "
                     f"`{label}` test examples predicted `{label}`. Mean ± std over seeds."))
    return out


def per_class_csv(analysis: dict[str, Any]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support of every arm of every group (fractions; support counts every
    seed's predictions): the rows of per_class.csv."""
    parts = [g["per_class_arms"].assign(dataset=g["dataset"], model=g["model"]) for g in analysis["groups"]
             if g.get("per_class_arms") is not None and len(g["per_class_arms"])]
    cols = ["dataset", "model", "arm", "label", "precision", "recall", "f1", "support"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def doc_files() -> dict[str, bytes]:
    """The docs the report links to (``docs/report.md``, ``docs/methods.md``), read from the peftbench sources, to
    embed in report.html; empty for an installation without them (the links are then plain text)."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    return {f"docs/{n}": (docs / n).read_bytes() for n in ("report.md", "methods.md") if (docs / n).is_file()}


def _records(frame: pd.DataFrame | None) -> list[dict[str, Any]]:
    return [] if frame is None else render.records(frame)


def results_json(analysis: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything in the report as JSON (fractions for metrics in tables, points in verdicts and efficiency)."""
    from peftbench.spectrum import intruder_table

    groups = []
    for g in analysis["groups"]:
        groups.append({"model": g["model"], "dataset": g["dataset"], "reference": g["reference"], "best_arm": g["best"],
                       "labels": g["labels"], "error_by_length": render.records(g["by_length"]),
                       "per_class_best_arm": render.records(g["per_class"]) if g["per_class"] is not None else [],
                       "confident_mistakes": render.records(g["mistakes"]) if g["mistakes"] is not None else [],
                       "disagreement": None if g["pair"] is None else
                       {"a": g["pair"][0], "b": g["pair"][1], **g["disagree_counts"],
                        "examples_listed": render.records(g["disagree"])},
                       "intruders": render.records(intruder_table(g.get("spectra") or {})),
                       "calibration": _records(g.get("calibration")),
                       "reliability_bins": {a: render.records(b) for a, b in (g.get("reliability") or {}).items()},
                       "out_of_scope": _records(g.get("out_of_scope")),
                       "top_confusions_best_arm": _records(g.get("top_confusions")),
                       "confusion_matrix_best_arm": None if g["confusion"] is None else
                       [[int(x) for x in row] for row in g["confusion"]]})
    return {"title": meta["title"], "store": meta["store"], "settings": render.jsonable(analysis["settings"]),
            "arms": render.records(analysis["table"]), "nuisance": render.records(analysis["nuisance"]),
            "efficiency": render.records(analysis["efficiency"]), "verdicts": render.records(analysis["verdicts"]),
            "tuning": render.records(analysis["tuning"]) if "tuning" in analysis else [],
            "lr_readout": render.records(analysis["lr_readout"]) if "lr_readout" in analysis else [],
            "lr_grid": render.records(analysis["lr_grid"]) if "lr_grid" in analysis else [],
            "data": render.jsonable(analysis.get("data") or []),
            "groups": groups, "failed_runs": render.records(analysis["failed"]),
            "checks": render.records(analysis["checks"])}

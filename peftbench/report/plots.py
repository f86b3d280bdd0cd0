"""Report figures. Each function takes tables (one model × dataset group) and returns a matplotlib Figure, or None
when there is nothing to draw. Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no display,
no global backend switch: ``savefig`` renders PNG with the Agg canvas), and :func:`png` turns one into PNG bytes.

Example::

    >>> import pandas as pd
    >>> from peftbench.report.plots import pareto_front
    >>> t = pd.DataFrame({"params_trainable": [10, 100, 1000], "accuracy": [0.8, 0.7, 0.9]})
    >>> pareto_front(t, "params_trainable", "accuracy")
    [0, 2]
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay

from peftbench import methods


def png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _pts(x: Any) -> Any:
    return 100.0 * x


def metric_vs_rank(table: pd.DataFrame, metric: str = "accuracy") -> Figure | None:
    """Test ``metric`` (points) against LoRA rank on a log axis, error bars = std over seeds; full fine-tuning and
    the frozen encoder as horizontal reference lines (shaded ± their std)."""
    ranked = table[table["r"].notna()].sort_values("r")
    if not len(ranked):
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method, part in ranked.groupby("method", sort=False):
        ax.errorbar(part["r"], _pts(part[metric]), yerr=_pts(part[f"{metric}_std"].fillna(0)), marker="o",
                    capsize=4, label=f"{method} (mean ± std over seeds)")
    for method, (label, color, style) in methods.plot_lines().items():
        ref = table[table["method"] == method]
        for _, row in ref.iterrows():
            y, sd = _pts(row[metric]), _pts(row[f"{metric}_std"]) if pd.notna(row[f"{metric}_std"]) else 0.0
            ax.axhline(y, color=color, linestyle=style, label=f"{row['arm']} ({label})")
            if sd:
                ax.axhspan(y - sd, y + sd, color=color, alpha=0.1)
    ranks = sorted(ranked["r"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(int(r)) for r in ranks])
    ax.set_xlabel("LoRA rank r (log scale)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{metric} vs rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def pareto_front(table: pd.DataFrame, x: str, y: str) -> list[int]:
    """Index labels of the rows no other row beats on both fewer ``x`` and higher ``y`` (sorted by ``x``)."""
    pts = table[[x, y]].dropna().sort_values([x, y], ascending=[True, False], kind="stable")
    front, best = [], -np.inf
    for idx, row in pts.iterrows():
        if row[y] > best:
            front.append(idx)
            best = row[y]
    return front


def metric_vs_params(table: pd.DataFrame, metric: str = "accuracy") -> Figure | None:
    """Test ``metric`` against trainable parameters (log axis); the Pareto frontier (no arm has fewer parameters and
    a higher score) is joined and ringed. Arms without trainable parameters (untrained head) are a horizontal line."""
    plotted = table[(table["params_trainable"] > 0) & table[metric].notna()]
    if not len(plotted):
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.errorbar(plotted["params_trainable"], _pts(plotted[metric]), yerr=_pts(plotted[f"{metric}_std"].fillna(0)),
                fmt="o", capsize=3, color="tab:blue", label="arm (mean ± std)")
    for _, row in plotted.iterrows():
        ax.annotate(str(row["arm"]), (row["params_trainable"], _pts(row[metric])), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    front = plotted.loc[pareto_front(plotted, "params_trainable", metric)]
    ax.step(front["params_trainable"], _pts(front[metric]), where="post", color="tab:orange", alpha=0.7)
    ax.scatter(front["params_trainable"], _pts(front[metric]), s=160, facecolors="none", edgecolors="tab:orange",
               label="Pareto frontier")
    for _, row in table[(table["params_trainable"].fillna(0) == 0) & table[metric].notna()].iterrows():
        ax.axhline(_pts(row[metric]), color="tab:gray", linestyle=":", label=f"{row['arm']} (no trainable params)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{metric} vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def training_curves(curves: dict[str, pd.DataFrame]) -> Figure | None:
    """One panel per arm: train and validation loss (left axis) and accuracy (right axis) per epoch, averaged over
    the arm's seeds. ``curves`` maps arm → the stacked metrics.jsonl rows of its runs."""
    curves = {arm: c for arm, c in curves.items() if len(c) and "epoch" in c}
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = int(np.ceil(len(curves) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (arm, c) in zip(axes, curves.items()):
        mean = c.groupby("epoch").mean(numeric_only=True)
        acc_ax = ax.twinx()
        for col, color, style in (("train_loss", "tab:blue", "-"), ("val_loss", "tab:blue", "--")):
            if col in mean:
                ax.plot(mean.index, mean[col], color=color, linestyle=style, marker=".", label=col)
        for col, color, style in (("train_accuracy", "tab:green", "-"), ("val_accuracy", "tab:green", "--")):
            if col in mean:
                acc_ax.plot(mean.index, _pts(mean[col]), color=color, linestyle=style, marker=".", label=col)
        ax.set_title(str(arm), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss", color="tab:blue")
        acc_ax.set_ylabel("accuracy (%)", color="tab:green")
        lines = ax.get_legend_handles_labels()
        more = acc_ax.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
        ax.grid(alpha=0.3)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def confusion_matrix(matrix: np.ndarray, labels: list[str], title: str) -> Figure:
    """Confusion matrix counts (rows = gold, columns = predicted); numbers printed up to 20 classes."""
    k = len(labels)
    size = min(4 + 0.3 * k, 16)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    disp = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=labels)
    disp.plot(ax=ax, include_values=k <= 20, cmap="Blues", colorbar=True, xticks_rotation=45 if k > 4 else "horizontal")
    if k > 30:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title)
    return fig


def train_time(table: pd.DataFrame) -> Figure | None:
    """Training time per arm (mean ± std over seeds); log axis when the times span more than two decades. Arms that
    do not train (untrained head) are left out."""
    t = table[(table["train_time_s"] > 0) & table["method"].map(methods.in_cost_plot).astype(bool)]
    if not len(t):
        return None
    fig = Figure(figsize=(6, 0.5 * len(t) + 1.5))
    ax = fig.subplots()
    y = np.arange(len(t))
    ax.barh(y, t["train_time_s"], xerr=t["train_time_s_std"].fillna(0), capsize=3, color="tab:purple", alpha=0.8)
    ax.set_yticks(y, [str(a) for a in t["arm"]])
    ax.invert_yaxis()
    if t["train_time_s"].max() / t["train_time_s"].min() > 100:
        ax.set_xscale("log")
    ax.set_xlabel("training time (s, mean over seeds)")
    ax.set_title("training time per arm")
    ax.grid(axis="x", alpha=0.3)
    return fig


def tuning_curves(tuning: pd.DataFrame, selection_metric: str = "accuracy") -> Figure | None:
    """Expected best validation score (points, or the loss) against the number of nuisance settings tried, one line
    per arm (:func:`peftbench.report.tables.tuning_curves`); None when no arm tried more than one setting."""
    if tuning is None or not len(tuning) or tuning["of"].max() < 2:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    scale = 1.0 if selection_metric == "loss" else 100.0
    for arm, part in tuning.groupby("arm", sort=False):
        ax.plot(part["trials"], scale * part["expected_best"], marker="o", label=arm)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("nuisance settings tried (trials)")
    ax.set_ylabel(f"expected best validation {selection_metric}" + ("" if scale == 1 else " (points)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def intruder_curves(curves: pd.DataFrame | None, k: int | None = None) -> Figure | None:
    """Intruder dimensions per run (summed over the adapted matrices, mean over runs) against the similarity threshold
    ε, one line per arm (:func:`peftbench.spectrum.intruder_curves`); the default ε = 0.5 marked. None when no arm has
    intruder data."""
    from peftbench.spectrum import INTRUDER_EPSILON

    if curves is None or not len(curves):
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for arm, part in curves.groupby("arm", sort=False):
        ax.plot(part["epsilon"], part["per_run"], marker=".", label=arm)
    ax.axvline(INTRUDER_EPSILON, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("similarity threshold ε (intruder: max |cos| with every pretrained singular vector < ε)")
    ax.set_ylabel("intruder dimensions per run" + (f" (top {k} per matrix)" if k else ""))
    ax.set_title("intruder dimensions vs ε (Shuttleworth et al. 2024)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def lr_curves(grid: pd.DataFrame | None, selection_metric: str = "accuracy") -> Figure | None:
    """Mean validation score against the learning rate (log axis), one line per arm
    (:func:`peftbench.report.tables.lr_readout`'s grid); each arm's best learning rate starred. None when empty."""
    if grid is None or not len(grid):
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    scale = 1.0 if selection_metric == "loss" else 100.0
    for arm, part in grid.groupby("arm", sort=False):
        part = part.sort_values("lr")
        (line,) = ax.plot(part["lr"], scale * part["val_score"], marker="o", label=arm)
        best = part[part["best"]]
        ax.scatter(best["lr"], scale * best["val_score"], marker="*", s=220, color=line.get_color(), zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale; ★ = best on validation)")
    ax.set_ylabel(f"mean validation {selection_metric}" + ("" if scale == 1 else " (points)"))
    ax.set_title("validation score vs learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig

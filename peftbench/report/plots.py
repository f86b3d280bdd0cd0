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



def titled(fig: Figure, where: str) -> Figure:
    """The figure with ``where`` (dataset · model) as a line above everything, so that a PNG names its data."""
    fig.suptitle(where, y=1.0, va="bottom", fontsize=9, color="0.3")
    return fig


def legend_outside(ax, **kwargs) -> None:
    """The axes' legend to the right of the plot, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


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
    legend_outside(ax)
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
    """Test ``metric`` against trainable parameters (log axis) of the fine-tuned encoders, one marker and legend entry
    per arm (error bars = std over seeds; no text next to the points); the Pareto frontier (no arm has fewer
    parameters and a higher score) is joined and ringed. Arms of methods off the parameter axis (``methods.on_params_axis``: baselines, the
    untrained head, the LSTM) and arms without trainable parameters are horizontal lines, not points on the parameter axis."""
    has_score = table[metric].notna()
    off = ~table["method"].map(methods.on_params_axis).astype(bool) | ~(table["params_trainable"].fillna(0) > 0)
    plotted = table[has_score & ~off]
    if not len(plotted):
        return None
    fig = Figure(figsize=(7.5, 4))
    ax = fig.subplots()
    markers = "osD^vP*Xhp<>"
    for i, (_, row) in enumerate(plotted.iterrows()):
        sd = row[f"{metric}_std"]
        ax.errorbar([row["params_trainable"]], [_pts(row[metric])], yerr=[_pts(sd) if pd.notna(sd) else 0.0],
                    fmt=markers[i % len(markers)], capsize=3, color=f"C{i % 10}", label=str(row["arm"]))
    front = plotted.loc[pareto_front(plotted, "params_trainable", metric)]
    ax.step(front["params_trainable"], _pts(front[metric]), where="post", color="0.2", alpha=0.6)
    ax.scatter(front["params_trainable"], _pts(front[metric]), s=160, facecolors="none", edgecolors="0.2",
               label="Pareto frontier")
    styles = [":", "-.", "--", (0, (1, 3))]
    for j, (_, row) in enumerate(table[has_score & off].iterrows()):
        ax.axhline(_pts(row[metric]), color="0.45", linestyle=styles[j % len(styles)], lw=1.2,
                   label=f"{row['arm']} (baseline, not on this axis)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters of the fine-tuned model (log scale)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{metric} vs trainable parameters (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def training_curves(curves: dict[str, pd.DataFrame]) -> Figure | None:
    """One panel per arm: train and validation loss (left axis) and accuracy (right axis) per epoch, averaged over
    the arm's seeds; every epoch marked (a 2-epoch curve is two points, not a bare line); one legend for all panels,
    beside them. ``curves`` maps arm → the stacked metrics.jsonl rows of its runs."""
    curves = {arm: c for arm, c in curves.items() if len(c) and "epoch" in c}
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = int(np.ceil(len(curves) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    legend: dict[str, Any] = {}
    for ax, (arm, c) in zip(axes, curves.items()):
        mean = c.groupby("epoch").mean(numeric_only=True)
        marker = "o" if len(mean) <= 10 else "."
        acc_ax = ax.twinx()
        for target, scale, series in ((ax, 1.0, (("train_loss", "tab:blue", "-"), ("val_loss", "tab:blue", "--"))),
                                      (acc_ax, 100.0, (("train_accuracy", "tab:green", "-"),
                                                       ("val_accuracy", "tab:green", "--")))):
            for col, color, style in series:
                if col in mean:
                    (line,) = target.plot(mean.index, scale * mean[col], color=color, linestyle=style, marker=marker,
                                          markersize=4, label=col)
                    legend.setdefault(col, line)
        ax.set_title(str(arm), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss", color="tab:blue")
        acc_ax.set_ylabel("accuracy (%)", color="tab:green")
        ax.grid(alpha=0.3)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95),
               frameon=False)
    return fig


def confusion_matrix(matrix: np.ndarray, labels: list[str], title: str) -> Figure:
    """Confusion matrix counts (rows = gold, columns = predicted); numbers printed up to 20 classes (the report draws
    it only up to :data:`peftbench.report.errors.MANY_CLASSES` classes, and lists the top confusions above)."""
    k = len(labels)
    size = min(4 + 0.3 * k, 16)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    disp = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=labels)
    disp.plot(ax=ax, include_values=k <= 20, cmap="Blues", colorbar=True, xticks_rotation=45 if k > 4 else "horizontal")
    ax.set_title(title)
    return fig


def reliability_diagram(bins: dict[str, pd.DataFrame] | None, summary: pd.DataFrame | None = None) -> Figure | None:
    """Accuracy against mean confidence per confidence bin, one line per arm
    (:func:`peftbench.report.calibration.calibration_table`), the diagonal = perfect calibration; the legend gives
    each arm's ECE. None when no arm has probabilities."""
    if not bins:
        return None
    ece = {} if summary is None or not len(summary) else dict(zip(summary["arm"], summary["ece"]))
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 100], [0, 100], color="0.5", linestyle="--", lw=1, label="perfect calibration")
    for arm, b in bins.items():
        label = f"{arm} (ECE {_pts(ece[arm]):.1f})" if arm in ece else str(arm)
        ax.plot(_pts(b["confidence"]), _pts(b["accuracy"]), marker="o", markersize=4, label=label)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("mean confidence in the bin (%, largest class probability)")
    ax.set_ylabel("accuracy in the bin (%)")
    ax.set_title("reliability diagram (15 equal-width bins, seeds pooled)")
    ax.grid(alpha=0.3)
    legend_outside(ax)
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
    legend_outside(ax)
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
    legend_outside(ax)
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
    legend_outside(ax)
    return fig

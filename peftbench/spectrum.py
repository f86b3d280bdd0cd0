"""What rank does the task need? Singular values of each layer's learned weight update.

For every adapted weight matrix (query/value by default) the update ΔW = W_trained − W_pretrained is computed and its
singular values σ₁ ≥ σ₂ ≥ … summarise how many directions the update really uses:

- ``effective_rank_90``: the smallest k whose top-k singular values hold 90% of the squared spectrum (the energy
  ‖ΔW‖²_F = Σσ²);
- ``stable_rank``: ‖ΔW‖²_F / σ₁², a smooth lower bound of the rank that ignores tiny singular values.

One method-agnostic rule gives ΔW for every method: the trained layer is applied, in float64 and eval mode, to the
identity matrix, which yields its effective weight (LoRA: W + B·A·scale; DoRA: the magnitude-rescaled weight;
PiSSA/OLoRA: W_residual + B·A·scale; AdaLoRA: W + B·(A∘E)·scale; (IA)³: diag(l)·W or W·diag(l); VeRA:
W + Λ_b·B·Λ_d·A). The pretrained matrix comes from a CPU copy taken before the method touched the model (PiSSA and
OLoRA rewrite the base weights at initialisation). Full fine-tuning is analysed on the same matrices.

**Intruder dimensions** (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv:2410.21228): the top-k left singular vectors u'ᵢ of the fine-tuned weight W' = W + ΔW are compared by cosine
similarity with *all* left singular vectors u_j of the pretrained W; u'ᵢ is an intruder at threshold ε when
maxⱼ |cos(u'ᵢ, u_j)| < ε (singular vectors have no sign, hence |cos|). Each row stores the k best similarities, so
the count at any ε can be read back (:func:`intruder_count`); defaults k = 10, ε = 0.5, counts also at 0.3 and 0.7.

``spectrum.json`` in a run folder holds ``{"energy": 0.9, "top": 64, "intruder_k": 10, "intruder_epsilons": [0.3, 0.5,
0.7], "rows": [ROW, ...]}`` with one ROW per matrix: ``name``, ``layer`` (int or null), ``module`` (the target name it
matched), ``shape``, ``singular_values`` (the top 64), ``effective_rank_90``, ``stable_rank``, ``fro_norm`` (‖ΔW‖_F),
``rel_fro_norm`` (‖ΔW‖_F / ‖W‖_F), ``intruder_max_cos`` (maxⱼ |cos(u'ᵢ, u_j)| for i = 1 … k) and ``intruders``
(``{"0.5": count, ...}`` at each stored ε).

Example::

    >>> import torch
    >>> from peftbench.spectrum import effective_rank, stable_rank
    >>> s = torch.tensor([3.0, 1.0, 0.1])
    >>> effective_rank(s), round(stable_rank(s), 3)
    (2, 1.112)

In a report::

    rows_by_arm = load_spectra(results_dataframe)          # arm → rows of its runs' spectrum.json
    fig = spectrum_figure(rows_by_arm)                    # spectra, cumulative energy, effective rank per layer
    lines = spectrum_sentences(rows_by_arm, reference="full")
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftbench.models import encoder_linear_paths, matches_target
from peftbench.store import SPECTRUM

ENERGY = 0.9  # share of the squared spectrum the effective rank must hold
TOP = 64  # singular values stored per matrix
INTRUDER_K = 10  # top singular vectors of the fine-tuned weight checked for intruders (Shuttleworth et al. 2024)
INTRUDER_EPSILONS = (0.3, 0.5, 0.7)  # similarity thresholds the counts are stored and reported at
INTRUDER_EPSILON = 0.5  # the headline threshold


# --------------------------------------------------------------------------------------------------------------------
# Computing spectra (pure torch)
# --------------------------------------------------------------------------------------------------------------------


def effective_rank(singular_values: torch.Tensor | np.ndarray, energy: float = ENERGY) -> int:
    """Smallest k such that the top-k singular values hold ``energy`` of Σσ² (0 for a zero update)."""
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    total = (s**2).sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(s**2, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12).item()) + 1


def stable_rank(singular_values: torch.Tensor | np.ndarray) -> float:
    """‖ΔW‖²_F / ‖ΔW‖²₂ = Σσ² / σ₁² (0 for a zero update)."""
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    if len(s) == 0 or s[0] <= 0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)


def intruder_similarity(pretrained: torch.Tensor, finetuned: torch.Tensor, k: int = INTRUDER_K) -> list[float]:
    """maxⱼ |cos(u'ᵢ, u_j)| for the top-``k`` left singular vectors u'ᵢ of ``finetuned`` (in order of their singular
    values) against all left singular vectors u_j of ``pretrained`` (both (out, in) weight matrices, float64 SVD).
    Singular vectors are unit vectors, so the cosine is the dot product."""
    u_before = torch.linalg.svd(pretrained.to(torch.float64), full_matrices=False)[0]
    u_after = torch.linalg.svd(finetuned.to(torch.float64), full_matrices=False)[0][:, :k]
    return [float(v) for v in (u_after.T @ u_before).abs().max(dim=1).values]


def intruder_count(max_cos: list[float] | np.ndarray, epsilon: float = INTRUDER_EPSILON) -> int:
    """How many of the fine-tuned top singular vectors are intruders: maxⱼ |cos| < ``epsilon``."""
    return int((np.asarray(max_cos, dtype=float) < epsilon).sum())


def snapshot(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """CPU copies of the pretrained weights of the nn.Linear layers matching ``targets`` (path → weight).

    Take it before a method wraps or rewrites the model; only the target matrices are copied."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().to("cpu", copy=True) for name in encoder_linear_paths(model)
            if any(matches_target(name, t) for t in targets)}


def _find(model: nn.Module, name: str) -> nn.Module | None:
    """The module at ``name`` in the original model, under peft's ``base_model.model.`` prefix if wrapped."""
    modules = dict(model.named_modules())
    return modules.get(name) or modules.get("base_model.model." + name)


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly adapter-wrapped) linear layer applies, in float64 on CPU: layer(I) − layer(0), in eval
    mode, transposed. A plain nn.Linear is read directly."""
    if type(module) is nn.Linear:
        return module.weight.detach().to("cpu", torch.float64)
    layer = copy.deepcopy(module).to("cpu", torch.float64).eval()
    d_in = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).in_features
    eye = torch.eye(d_in, dtype=torch.float64)
    return (layer(eye) - layer(torch.zeros(1, d_in, dtype=torch.float64))).T


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def layer_spectra(model: nn.Module, pretrained: dict[str, torch.Tensor], targets: list[str] | None = None,
                  top: int = TOP, energy: float = ENERGY, intruder_k: int = INTRUDER_K,
                  epsilons: tuple[float, ...] = INTRUDER_EPSILONS) -> list[dict[str, Any]]:
    """One row per matrix of ``pretrained``: the singular values of its update in the trained ``model`` and the
    intruder dimensions of its trained weight (:func:`intruder_similarity`)."""
    rows = []
    for name, before in pretrained.items():
        module = _find(model, name)
        if module is None:
            continue
        before = before.to(torch.float64)
        after = effective_weight(module)
        delta = after - before
        max_cos = intruder_similarity(before, after, intruder_k)
        s = torch.linalg.svdvals(delta)
        fro = float(torch.sqrt((s**2).sum()))
        module_name = next((t for t in (targets or []) if matches_target(name, t)), name.split(".")[-1])
        rows.append({"name": name, "layer": _layer_index(name), "module": module_name, "shape": list(delta.shape),
                     "singular_values": [float(v) for v in s[:top]], "effective_rank_90": effective_rank(s, energy),
                     "stable_rank": stable_rank(s), "fro_norm": fro,
                     "rel_fro_norm": fro / max(float(torch.linalg.matrix_norm(before)), 1e-30),
                     "intruder_max_cos": max_cos,
                     "intruders": {f"{eps:g}": intruder_count(max_cos, eps) for eps in epsilons}})
    return rows


def record(rows: list[dict[str, Any]], energy: float = ENERGY, top: int = TOP, intruder_k: int = INTRUDER_K,
           epsilons: tuple[float, ...] = INTRUDER_EPSILONS) -> dict[str, Any]:
    """What ``spectrum.json`` holds (the store writes it: :meth:`peftbench.store.RunWriter.write_spectrum`)."""
    return {"energy": energy, "top": top, "intruder_k": intruder_k, "intruder_epsilons": list(epsilons), "rows": rows}


def read_spectrum(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The rows of a run's ``spectrum.json``, or None when it has none."""
    path = Path(run_dir) / SPECTRUM
    if not path.is_file():
        return None
    return json.loads(path.read_text())["rows"]


# --------------------------------------------------------------------------------------------------------------------
# Reporting (pure: rows → table, figure, sentences)
# --------------------------------------------------------------------------------------------------------------------


def load_spectra(results) -> dict[str, list[dict[str, Any]]]:
    """arm → spectrum rows of its successful runs (each row tagged with ``run_id``), from a ``load_results``
    DataFrame (columns ``arm``, ``path``, ``run_id``, ``status``). Arms without spectra are left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    for _, run in results.iterrows():
        if run.get("status", "success") != "success":
            continue
        rows = read_spectrum(run["path"])
        if rows:
            out.setdefault(run["arm"], []).extend({**r, "run_id": run["run_id"]} for r in rows)
    return out


def spectrum_table(rows_by_arm: dict[str, list[dict[str, Any]]]):
    """One row per (arm, module): matrices, runs, effective rank (median and max over layers × runs), stable rank
    (median) and relative update size ‖ΔW‖/‖W‖ (median)."""
    import pandas as pd

    records = []
    for arm, rows in rows_by_arm.items():
        frame = pd.DataFrame(rows)
        if "run_id" not in frame:
            frame["run_id"] = ""
        for module, g in frame.groupby("module", sort=False):
            records.append({"arm": arm, "module": module, "matrices": len(g), "runs": g["run_id"].nunique(),
                            "effective_rank_90_median": float(g["effective_rank_90"].median()),
                            "effective_rank_90_max": int(g["effective_rank_90"].max()),
                            "stable_rank_median": float(g["stable_rank"].median()),
                            "rel_update_median": float(g["rel_fro_norm"].median())})
    return pd.DataFrame(records)


def _intruder_rows(rows_by_arm: dict[str, list[dict[str, Any]]]):
    """arm → DataFrame of its rows that carry intruder similarities (older spectrum.json files have none)."""
    import pandas as pd

    out = {}
    for arm, rows in rows_by_arm.items():
        mine = [{"run_id": r.get("run_id", ""), "module": r["module"], "max_cos": r["intruder_max_cos"]}
                for r in rows if r.get("intruder_max_cos") is not None]
        if mine:
            out[arm] = pd.DataFrame(mine)
    return out


def _intruder_stats(frame, epsilon: float) -> tuple[float, float]:
    """(intruders per run: the sum over its matrices, mean over runs; intruders per matrix: mean over all)."""
    counts = frame["max_cos"].map(lambda c: intruder_count(c, epsilon))
    return float(counts.groupby(frame["run_id"]).sum().mean()), float(counts.mean())


def intruder_table(rows_by_arm: dict[str, list[dict[str, Any]]], epsilons: tuple[float, ...] = INTRUDER_EPSILONS):
    """One row per arm with intruder data: matrices, runs, ``k`` (top singular vectors checked), and for each ε
    ``intruders_per_run_eps{ε}`` (sum over the run's adapted matrices, mean over runs) and
    ``intruders_per_matrix_eps{ε}`` (mean over matrices × runs). Empty when no row has intruder data."""
    import pandas as pd

    records = []
    for arm, frame in _intruder_rows(rows_by_arm).items():
        record: dict[str, Any] = {"arm": arm, "matrices": int(frame.groupby("run_id").size().max()),
                                  "runs": frame["run_id"].nunique(), "k": int(frame["max_cos"].map(len).max())}
        for eps in epsilons:
            record[f"intruders_per_run_eps{eps:g}"], record[f"intruders_per_matrix_eps{eps:g}"] = \
                _intruder_stats(frame, eps)
        records.append(record)
    return pd.DataFrame(records)


def intruder_curves(rows_by_arm: dict[str, list[dict[str, Any]]], epsilons=None):
    """Intruders against the threshold ε (default 0.05 … 0.95): one row per (arm, ε) with ``per_run`` and
    ``per_matrix`` as in :func:`intruder_table`, for the report's plot."""
    import pandas as pd

    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if epsilons is None else epsilons
    records = [{"arm": arm, "epsilon": float(eps), **dict(zip(("per_run", "per_matrix"), _intruder_stats(frame, eps)))}
               for arm, frame in _intruder_rows(rows_by_arm).items() for eps in grid]
    return pd.DataFrame(records, columns=["arm", "epsilon", "per_run", "per_matrix"])


def intruder_sentences(rows_by_arm: dict[str, list[dict[str, Any]]], epsilon: float = INTRUDER_EPSILON) -> list[str]:
    """One sentence per arm, e.g. "lora r=8: 3 intruder dimensions per run at ε = 0.5 (0.25 per adapted matrix; top
    10 singular vectors of 12 matrices, 3 runs)."."""
    table = intruder_table(rows_by_arm, (epsilon,))
    lines = []
    for row in table.to_dict("records"):
        per_run, per_matrix = row[f"intruders_per_run_eps{epsilon:g}"], row[f"intruders_per_matrix_eps{epsilon:g}"]
        lines.append(f"{row['arm']}: {per_run:.3g} intruder dimension{'' if per_run == 1 else 's'} per run at "
                     f"ε = {epsilon:g} ({per_matrix:.2g} per adapted matrix; top {row['k']} singular vectors of "
                     f"{row['matrices']} matri{'x' if row['matrices'] == 1 else 'ces'}, {row['runs']} run"
                     f"{'' if row['runs'] == 1 else 's'}).")
    return lines


def _energy_curve(row: dict[str, Any]) -> np.ndarray:
    s = np.asarray(row["singular_values"], dtype=float)
    total = row["fro_norm"] ** 2
    return np.cumsum(s**2) / total if total > 0 else np.zeros_like(s)


def _mean_curve(curves: list[np.ndarray]) -> np.ndarray:
    """Mean of curves of possibly different lengths (a curve is extended by its last value)."""
    n = max(len(c) for c in curves)
    padded = [np.pad(c, (0, n - len(c)), mode="edge") if len(c) else np.zeros(n) for c in curves]
    return np.mean(padded, axis=0)


def spectrum_figure(rows_by_arm: dict[str, list[dict[str, Any]]], energy: float = ENERGY):
    """Three panels per study: (a) normalised singular values σ_k/σ₁, (b) cumulative energy Σ_{i≤k}σ²/Σσ² with the
    ``energy`` line, each averaged over layers and runs, and (c) the effective rank per layer (mean over runs). One
    colour per arm, one line style per module (query, value, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(rows_by_arm) > len(colours):
        colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    styles = ["-", "--", ":", "-."]
    modules = list(dict.fromkeys(r["module"] for rows in rows_by_arm.values() for r in rows))
    for i, (arm, rows) in enumerate(rows_by_arm.items()):
        colour = colours[i % len(colours)]
        for j, module in enumerate(modules):
            mine = [r for r in rows if r["module"] == module and r["fro_norm"] > 0]
            if not mine:
                continue
            style, label = styles[j % len(styles)], f"{arm} · {module}"
            normalised = _mean_curve([np.asarray(r["singular_values"]) / r["singular_values"][0] for r in mine])
            k = np.arange(1, len(normalised) + 1)
            axes[0].plot(k, normalised, style, color=colour, label=label)
            axes[1].plot(k, _mean_curve([_energy_curve(r) for r in mine]), style, color=colour, label=label)
            by_layer: dict[int, list[int]] = {}
            for r in mine:
                by_layer.setdefault(r["layer"] if r["layer"] is not None else 0, []).append(r["effective_rank_90"])
            layers = sorted(by_layer)
            axes[2].plot(layers, [np.mean(by_layer[layer]) for layer in layers], style, marker="o", color=colour,
                         label=label)
    axes[0].set(yscale="log", xscale="log", xlabel="k", ylabel=r"$\sigma_k / \sigma_1$", ylim=(1e-4, 1.5),
                title="(a) spectrum of the update ΔW (mean over layers)")
    axes[1].axhline(energy, color="grey", lw=0.8, ls="--")
    axes[1].set(xscale="log", xlabel="k", ylabel="share of ‖ΔW‖²_F in the top k", ylim=(0, 1.02),
                title=f"(b) cumulative energy ({energy:.0%} line)")
    axes[2].set(xlabel="layer", ylabel=f"effective rank ({energy:.0%} energy)", yscale="log",
                title="(c) effective rank per layer (mean over runs)")
    handles, labels = axes[2].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def spectrum_sentences(rows_by_arm: dict[str, list[dict[str, Any]]], reference: str | None = "full",
                       energy: float = ENERGY) -> list[str]:
    """One sentence per (arm, module), e.g. "full: the update to query has 90% of its energy in rank ≤ 7 in every
    layer (median 4 over 6 matrices from 3 runs; stable rank median 1.9; ‖ΔW‖/‖W‖ median 0.012).", then what the
    ``reference`` arm's rank means for the rank of the adapters."""
    if not rows_by_arm:
        return []
    table = spectrum_table(rows_by_arm)
    pct = f"{energy:.0%}"
    lines = []
    for row in table.itertuples():
        lines.append(f"{row.arm}: the update to {row.module} has {pct} of its energy in rank ≤ "
                     f"{row.effective_rank_90_max} in every layer (median {row.effective_rank_90_median:g} over "
                     f"{row.matrices} matrices from {row.runs} run{'s' if row.runs != 1 else ''}; stable rank median "
                     f"{row.stable_rank_median:.2g}; ‖ΔW‖/‖W‖ median {row.rel_update_median:.2g}).")
    ref = table[table["arm"] == reference] if reference else table.iloc[:0]
    if len(ref):
        k = int(ref["effective_rank_90_max"].max())
        stable = float(ref["stable_rank_median"].median())
        line = (f"Reading: {reference}'s update needs rank ≤ {k} for {pct} of its energy in every adapted matrix "
                f"(stable rank median {stable:.2g}); an adapter of rank ≥ {k} can express that much of it, one of "
                f"lower rank cannot.")
        if stable < k / 4:
            line += (" But a few directions dominate and the rest is a long flat tail, typical of optimizer noise "
                     "(Adam's updates are close to full rank) rather than structure the task needs: whether a much "
                     "lower rank suffices is answered by the accuracy of the adapters, not by the spectrum.")
        lines.append(line)
    return lines

"""Intruder dimensions (Shuttleworth et al. 2024, arXiv:2410.21228): a planted rank-1 update along directions the
pretrained weight barely uses is counted, a rescaling of the pretrained singular values is not, and the report helpers
sum and average the counts as documented."""

import pytest
import torch
from torch import nn

from peftbench import spectrum

N = 64


def _orthogonal(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.fixture(scope="module")
def svd():
    """W = U·diag(s)·Vᵀ with known singular vectors and distinct singular values 10 … 1."""
    u, v = _orthogonal(0), _orthogonal(1)
    s = torch.linspace(10.0, 1.0, N, dtype=torch.float64)
    return u, s, v


def _planted(u, s, v, scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, W + scale·a·bᵀ) where a (b) is the even mix of W's 16 weakest left (right) singular vectors: the new top
    direction a has |cos| = 1/4 with each of those 16 and 0 with all others."""
    w = u @ torch.diag(s) @ v.T
    a, b = u[:, -16:].sum(1) / 4, v[:, -16:].sum(1) / 4
    return w, w + scale * torch.outer(a, b)


def test_a_planted_rank_one_update_is_one_intruder(svd):
    w, tuned = _planted(*svd)
    max_cos = spectrum.intruder_similarity(w, tuned)
    assert len(max_cos) == spectrum.INTRUDER_K
    assert max_cos[0] == pytest.approx(0.25, abs=0.02)  # the new top singular vector: no pretrained counterpart
    assert max_cos[1:] == pytest.approx([1.0] * 9, abs=1e-9)  # W's own top directions, untouched
    assert [spectrum.intruder_count(max_cos, eps) for eps in (0.2, 0.3, 0.5, 0.7)] == [0, 1, 1, 1]


def test_rescaling_the_pretrained_singular_values_makes_no_intruder(svd):
    u, s, v = svd
    w = u @ torch.diag(s) @ v.T
    tuned = u @ torch.diag(1.1 * s**1.05) @ v.T  # every singular value changed (order kept), no direction new
    assert float(torch.linalg.matrix_norm(tuned - w) / torch.linalg.matrix_norm(w)) > 0.1
    max_cos = spectrum.intruder_similarity(w, tuned)
    assert min(max_cos) == pytest.approx(1.0, abs=1e-9)
    assert spectrum.intruder_count(max_cos, 0.99) == 0


def test_a_small_update_along_weak_directions_is_no_intruder(svd):
    """The same planted direction at a small scale stays below W's top 10: the top 10 are W's own vectors."""
    w, tuned = _planted(*svd, scale=0.5)
    assert spectrum.intruder_count(spectrum.intruder_similarity(w, tuned), 0.7) == 0


def test_layer_spectra_store_the_intruders_of_each_matrix(svd):
    w, tuned = _planted(*svd)
    model = nn.Module()
    model.query, model.value = nn.Linear(N, N, bias=False), nn.Linear(N, N, bias=False)
    with torch.no_grad():
        model.query.weight.copy_(tuned)
        model.value.weight.copy_(w)  # unchanged: ΔW = 0, no intruder
    pretrained = {"query": w.float(), "value": w.float()}
    rows = {r["name"]: r for r in spectrum.layer_spectra(model, pretrained, ["query", "value"])}
    assert rows["query"]["intruders"] == {"0.3": 1, "0.5": 1, "0.7": 1}
    assert rows["value"]["intruders"] == {"0.3": 0, "0.5": 0, "0.7": 0}
    assert len(rows["query"]["intruder_max_cos"]) == 10


def _rows(run_id: str, module: str, max_cos: list[float]) -> dict:
    return {"run_id": run_id, "module": module, "intruder_max_cos": max_cos}


def test_report_helpers_sum_over_matrices_and_average_over_runs():
    rows_by_arm = {
        "lora r=8": [_rows("a", "query", [0.2, 0.4, 0.9]), _rows("a", "value", [0.1, 0.95, 0.99]),
                     _rows("b", "query", [0.6, 0.9, 0.9]), _rows("b", "value", [0.9, 0.9, 0.9])],
        "full": [_rows("c", "query", [0.9, 0.95, 0.99]), _rows("c", "value", [0.98, 0.97, 0.99])],
        "old": [{"run_id": "d", "module": "query"}],  # a spectrum.json written before intruders were stored
    }
    table = spectrum.intruder_table(rows_by_arm).set_index("arm")
    assert list(table.index) == ["lora r=8", "full"]
    lora = table.loc["lora r=8"]
    assert (lora["matrices"], lora["runs"], lora["k"]) == (2, 2, 3)
    # ε = 0.5: run a has 2 + 1 = 3, run b 0 → 1.5 per run; 3 of 4 matrices' 12 vectors → 0.75 per matrix
    assert lora["intruders_per_run_eps0.5"] == 1.5 and lora["intruders_per_matrix_eps0.5"] == 0.75
    assert lora["intruders_per_run_eps0.7"] == 2.0 and lora["intruders_per_run_eps0.3"] == 1.0
    assert table.loc["full", "intruders_per_run_eps0.7"] == 0
    curves = spectrum.intruder_curves(rows_by_arm)
    lora_curve = curves[curves["arm"] == "lora r=8"].set_index("epsilon")["per_run"]
    assert lora_curve.is_monotonic_increasing and lora_curve.loc[0.05] == 0
    assert lora_curve.loc[0.95] == 5.0  # run a: 3 + 1, run b: 3 + 3
    line = spectrum.intruder_sentences(rows_by_arm)[0]
    assert line.startswith("lora r=8: 1.5 intruder dimensions per run at ε = 0.5 (0.75 per adapted matrix; top 3")
    assert spectrum.intruder_table({}).empty and spectrum.intruder_curves({}).empty

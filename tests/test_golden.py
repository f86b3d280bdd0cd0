"""Golden numbers: a tiny seeded study trained through the real pipeline must reproduce the losses, metrics and
predictions stored in ``tests/golden/tiny_study.json`` (like torchtune's recipe tests).

Refactors that should not change behaviour (moving code, renaming, splitting modules) must leave this test passing
*unchanged*; a change that alters what is trained or predicted (learning rate, schedule, seeding, batch order, head
initialisation, metric computation, ...) makes it fail.

The study: the tiny random BERT of ``tests/conftest.py`` on the tiny synthetic dataset, 5 epochs, methods
``untrained``, ``frozen``, ``lora``, ``full`` and the ``tfidf`` baseline, run with ``peftbench run`` on the CPU with one
torch thread. It compares, per arm (runs are matched by arm label, not run id, so a change of the run-id scheme does
not break it):

- every epoch of ``metrics.jsonl`` (losses, accuracies, F1, lr, step; times are left out),
- the validation and test metrics of ``result.json``, the best epoch and the parameter counts,
- the test predictions (exactly) and probabilities of ``predictions.parquet``.

Floats are compared with a relative tolerance of ``RTOL`` (and ``ATOL`` near zero), integers and predictions exactly.

**bf16 numerics differ across CPUs** (bf16 autocast only runs where the CPU has AVX512-BF16 or AMX, and its kernels
differ between them), so the golden study sets ``bf16 = false``: fp32 throughout, which is what makes the stored numbers
portable across machines. Keep it that way.

To regenerate the golden values after an *intended* behaviour change (say why in the commit message)::

    PEFTBENCH_UPDATE_GOLDEN=1 PYTHONPATH=$PWD python -m pytest -q tests/test_golden.py

then run the test again without the variable: it must pass.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from peftbench.cli import main
from peftbench.store import load_results
from tests.conftest import write_study

GOLDEN = Path(__file__).parent / "golden" / "tiny_study.json"
UPDATE = os.environ.get("PEFTBENCH_UPDATE_GOLDEN") == "1"
RTOL, ATOL = 1e-5, 1e-9

ARMS = """
[[arms]]
method = "untrained"

[[arms]]
method = "frozen"
lr = 1e-1

[[arms]]
method = "lora"
r = 4
lr = 3e-2

[[arms]]
method = "full"

[[arms]]
method = "tfidf"
"""
EPOCH_KEYS = ("epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro",
              "val_f1_weighted", "lr")



def observe(store: Path) -> dict[str, dict]:
    """What the golden file pins, per arm label, read from the store's files."""
    out = {}
    df = load_results(store)
    for _, row in df.sort_values("arm").iterrows():
        run = Path(row["path"])
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "success", result["error"]
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        preds = pd.read_parquet(run / "predictions.parquet")
        out[row["arm"]] = {
            "epochs": [{k: e[k] for k in EPOCH_KEYS} for e in epochs],
            "validation": result["metrics"]["validation"],
            "test": result["metrics"]["test"],
            "best_epoch": result["metrics"]["best_epoch"],
            "params": result["params"],
            "test_ids": preds["id"].tolist(),
            "test_pred": preds["pred"].tolist(),
            "test_probs": [[float(p) for p in probs] for probs in preds["probs"]],
        }
    return out


def dump(obj, depth: int = 0) -> str:
    """JSON with one key per line and each leaf value (a list of numbers included) on its key's line: short diffs."""
    if not isinstance(obj, dict) or not any(isinstance(v, dict) for v in obj.values()) and depth > 1:
        return json.dumps(obj, sort_keys=True)
    pad = " " * (depth + 1)
    items = ",\n".join(f"{pad}{json.dumps(k)}: {dump(v, depth + 1)}" for k, v in sorted(obj.items()))
    return "{\n" + items + "\n" + " " * depth + "}"


def assert_close(actual, expected, where: str = "") -> None:
    """Equal structure; floats within RTOL/ATOL (NaN equals NaN), everything else exactly."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), \
            f"{where}: keys {sorted(actual) if isinstance(actual, dict) else actual} != {sorted(expected)}"
        for k in expected:
            assert_close(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual} != NaN"
        else:
            assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL), f"{where}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_tiny_study_reproduces_the_golden_numbers(tmp_path, tiny_bert, tiny_data, one_thread):
    study = write_study(tmp_path / "golden.toml", tiny_bert, tiny_data, ARMS)
    study.write_text(study.read_text().replace("[train]\n", "[train]\nbf16 = false\n"))  # fp32: portable
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store), "--device", "cpu", "--no-report"]) == 0
    observed = observe(store)
    assert sorted(observed) == ["frozen", "full", "lora r=4", "tfidf", "untrained"]
    assert [len(observed[a]["epochs"]) for a in ("frozen", "full", "lora r=4")] == [5, 5, 5]
    if UPDATE or not GOLDEN.exists():
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(dump(observed) + "\n")
        if not UPDATE:
            pytest.fail(f"{GOLDEN} did not exist: written now; check it in and run the test again")
        return
    assert_close(observed, json.loads(GOLDEN.read_text()), "golden")

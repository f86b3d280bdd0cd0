"""Methods are plugins: no module outside ``peftbench/methods/`` branches on a method's name, and a new peft tuner is
one small class (registered, it validates, expands, trains and reloads like the shipped ones)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftbench
from peftbench import methods
from peftbench.config import ConfigError, expand_runs, validate_study
from peftbench.fields import Field, by_name
from peftbench.methods import METHODS, PeftMethod

PACKAGE = Path(peftbench.__file__).parent


def _names(node: ast.AST) -> set[str]:
    """The method names a node spells: a string constant, or a tuple / list / set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & set(METHODS)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names(e) for e in node.elts)) if node.elts else set()
    return set()


def _constant(node: ast.AST) -> bool:
    """A literal: the values of a lookup table (``{"full": 9}``, ``{"full": ("label", "red")}``)."""
    return isinstance(node, ast.Constant) or (isinstance(node, ast.Tuple) and all(_constant(e) for e in node.elts))


def method_branches(source: str) -> list[str]:
    """Comparisons of something called ``method`` with method names (``method == "lora"``, ``run.method in
    ("full", "frozen")``, ``df["method"] != "untrained"``, ``.isin(["majority"])``), loops over method names and
    tables keyed by method names (``{"full": 9, "frozen": 3}``; not a result's fields that happen to be named like
    methods), as source text."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names(o) for o in operands) and any("method" in ast.unparse(o) for o in operands if not _names(o)):
                out.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "isin":
            if "method" in ast.unparse(node.func.value) and any(_names(a) for a in node.args):
                out.append(ast.unparse(node))
        elif isinstance(node, (ast.For, ast.comprehension)) and len(_names(node.iter)) >= 2:
            out.append(f"for ... in {ast.unparse(node.iter)}")
        elif (isinstance(node, ast.Dict) and len(set().union(*(_names(k) for k in node.keys if k))) >= 2
              and all(_constant(v) for v in node.values)):
            out.append(ast.unparse(node)[:80])
        elif (isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set))
              and len(_names(node.value)) >= 2):  # a table of methods kept elsewhere, used by name (isin(TABLE))
            out.append(ast.unparse(node)[:80])
    return out


def test_the_branch_finder_sees_each_form():
    assert method_branches('if method == "lora": pass') == ["method == 'lora'"]
    assert method_branches('x = run.method in ("full", "frozen")')
    assert method_branches('t = df[df["method"] != "untrained"]')
    assert method_branches('t = df["method"].isin(["majority"])')
    assert method_branches('ORDER = {"majority": 0, "full": 9}')
    assert method_branches('OFF_AXIS = ("majority", "tfidf", "llm")')
    assert method_branches('arms = {m: df[df["method"] == m] for m in ("majority", "untrained")}')
    assert method_branches('if reference == "full": pass') == []  # an arm label, not a method
    assert method_branches('out = {"majority": floor, "untrained": arm}') == []  # a result's fields
    assert method_branches('t = df[df["method"] == reference]') == []


def test_no_module_outside_the_methods_package_branches_on_method_names():
    found = {str(path.relative_to(PACKAGE.parent)): hits for path in sorted(PACKAGE.rglob("*.py"))
             if "methods" not in path.relative_to(PACKAGE).parts and (hits := method_branches(path.read_text()))}
    assert not found, f"method-specific code outside peftbench/methods/: {found}"


class ToyLoha(PeftMethod):
    """The whole of a new tuner: peft's LoHa (low-rank Hadamard product) with its rank and alpha."""

    name = "toy_loha"
    doc = "LoHa through peft (a test's toy tuner)"
    params = by_name(Field("r", int, 4, "LoHa rank", minimum=1, expected="a rank >= 1"),
                     Field("alpha", int, 8, "LoHa scaling numerator", minimum=1),
                     methods.peft_methods.targets_field(), methods.base.head_field())
    label_keys = ("r",)

    def peft_config(self, backbone, params, total_steps=None):
        from peft import LoHaConfig

        return LoHaConfig(r=params["r"], alpha=params["alpha"], target_modules=self.targets(backbone, params),
                          modules_to_save=methods.resolve_head(backbone, params))


@pytest.fixture
def toy_tuner():
    methods.register(ToyLoha())
    yield METHODS["toy_loha"]
    del METHODS["toy_loha"]


def test_a_new_peft_tuner_is_one_small_class(toy_tuner, tiny_bert, tmp_path):
    study = validate_study({"name": "toy", "models": [str(tiny_bert)], "arms": [{"method": "toy_loha", "r": [2, 4]}]})
    runs = expand_runs(study)
    assert [r.arm for r in runs] == ["toy_loha r=2", "toy_loha r=4"]
    assert runs[0].method_params == {"r": 2, "alpha": 8, "target_modules": "auto"}  # head at its default: left out
    with pytest.raises(ConfigError, match=r"^study: arms\[0\]\.r: expected a rank >= 1, got 0$"):
        validate_study({"arms": [{"method": "toy_loha", "r": 0}]})
    with pytest.raises(ConfigError, match=r"unknown key 'init_r'"):
        validate_study({"arms": [{"method": "toy_loha", "init_r": 4}]})

    from peftbench.models import build_classifier

    backbone = build_classifier(str(tiny_bert), 2, "auto", ["neg", "pos"])
    params = runs[0].method_params
    model = methods.prepare("toy_loha", backbone, params)
    head = methods.resolved_names("toy_loha", backbone, params)["head"]
    counts = methods.count_parameters(model, head)
    assert counts["adapter"] > 0 and counts["trainable"] == counts["adapter"] + counts["head"]
    assert methods.spectrum_targets("toy_loha", backbone, params) == ["query", "value"]
    size = methods.save_weights("toy_loha", model, tmp_path, base_model="tiny")
    assert size > 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()
    again = methods.load_weights("toy_loha", build_classifier(str(tiny_bert), 2, "auto", ["neg", "pos"]), tmp_path)
    assert type(methods.merge_for_inference("toy_loha", again)).__name__ == type(backbone.model).__name__

"""The README stays true: its config reference is the one generated from the field specs."""

from pathlib import Path

from peftbench.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, (
        "README's study-file reference is stale: regenerate it with "
        "python -c 'from peftbench.config import reference_markdown; print(reference_markdown())'")


def test_readme_starts_with_the_two_commands_and_ci_calls_the_test_one():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()

"""Reports from the run store (issue #3 fills this in)."""

from pathlib import Path


def write_report(store, run_ids=None, study=None, out_dir=None) -> Path:
    out = Path(out_dir or Path(store) / "report")
    out.mkdir(parents=True, exist_ok=True)
    return out

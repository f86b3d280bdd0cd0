"""peftbench: controlled fine-tuning studies of transformer encoders for text classification.

How much accuracy do you give up (or gain) with LoRA at rank r, versus full fine-tuning or a frozen encoder, and what
does each cost? A study (models × datasets × methods × ranks × learning rates × seeds) expands into runs; each run
trains and evaluates once into a content-addressed store; a report turns the store into tables, plots and a verdict.

    >>> from peftbench import load_study, expand_runs, run_study, load_results  # doctest: +SKIP
    >>> from peftbench import load_predictions, load_curves                   # doctest: +SKIP
"""

from peftbench.config import ConfigError, expand_runs, load_study
from peftbench.store import load_results

__all__ = ["ConfigError", "expand_runs", "load_study", "load_results", "run_study", "load_predictions", "load_curves"]
__version__ = "0.1.0"


def run_study(*args, **kwargs):
    """Run a study into a store (see :func:`peftbench.executors.run_study`)."""
    from peftbench.executors import run_study as _run_study

    return _run_study(*args, **kwargs)


_FROM_REPORT = ("load_predictions", "load_curves")


def __getattr__(name: str):
    """``load_predictions`` and ``load_curves`` (:mod:`peftbench.report`), imported on first use, so ``import
    peftbench`` does not load the report's plotting stack."""
    if name in _FROM_REPORT:
        from peftbench import report

        return getattr(report, name)
    raise AttributeError(f"module 'peftbench' has no attribute {name!r}")

"""Progress output that reads well on a terminal and in a log.

On a terminal (``sys.stderr.isatty()``) training shows tqdm bars: one per run's steps and one for the study. Written
to a file or a CI log, bars are off (tqdm's redrawing would leave one line per refresh, with cursor-up codes, and glue
other lines to bar fragments): each run prints one line per epoch and one when it ends, each with an ETA.

:func:`quiet_libraries` silences what the libraries print for every run: transformers' "Loading weights" / "Writing
model shards" bars and its "LOAD REPORT" warnings (a fresh classification head is expected here), and the hub's
download bars. The command line calls it once; Python callers may.

    >>> from peftbench.progress import bar, say
    >>> with bar(total=3, desc="demo") as b:   # a bar on a terminal, nothing in a log
    ...     b.update(3)
    >>> say("done   demo")                     # always one line (above the bars on a terminal)
    done   demo
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


BARS = True  # False in worker processes: their runs print a line per epoch instead of bars


def interactive() -> bool:
    """Whether progress goes to a terminal (then bars are drawn)."""
    if not BARS:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def bar(**kwargs) -> tqdm:
    """A tqdm bar that is drawn on a terminal only (disabled, costing nothing, in a log)."""
    kwargs.setdefault("disable", not interactive())
    return tqdm(**kwargs)


def say(line: str) -> None:
    """Print one line, above the bars when there are any."""
    tqdm.write(line)


def eta(elapsed_s: float, done: float, total: float) -> str:
    """``"1:05"`` (tqdm's format): the time left if the rest goes at the pace so far; ``""`` when nothing is left."""
    if done <= 0 or done >= total:
        return ""
    return tqdm.format_interval(elapsed_s / done * (total - done))


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's progress bars and transformers' warnings (errors still show).

    Through their environment variables when they are not imported yet (so a command that never loads a model pays
    nothing), through their functions when they are."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()

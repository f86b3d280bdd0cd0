"""Reaching the Hugging Face hub without hanging: one quick probe, then offline mode for the whole process.

Hub model and dataset ids are loaded through transformers / datasets as usual. When the hub cannot be reached (no
network, a firewall, DNS failing), those libraries retry each request several times before giving up, so a
``peftbench validate`` of a hub study would spend half a minute per name printing retries. :func:`ensure_reachable`
probes the hub once (a TCP connection with a short timeout); when it fails, it switches huggingface_hub, datasets and
transformers to their offline mode (``HF_HUB_OFFLINE``), so a name found in the local Hugging Face cache still
loads, and anything else fails at once with the libraries' own "not in the cache" error, which peftbench turns into
one line.

Example::

    >>> from peftbench.hub import ensure_reachable
    >>> ensure_reachable()  # doctest: +SKIP
    False
"""

from __future__ import annotations

import functools
import os
import socket
import sys

HOST = "huggingface.co"
PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def ensure_reachable() -> bool:
    """True when the hub answers (or offline mode was asked for already: False); otherwise switch this process to
    offline mode and return False."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection((os.environ.get("PEFTBENCH_HUB_HOST", HOST), 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        go_offline()
        return False


def go_offline() -> None:
    """Offline mode for huggingface_hub, datasets and transformers, also when they are imported already."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        if hasattr(config, "HF_DATASETS_OFFLINE"):
            config.HF_DATASETS_OFFLINE = True


OFFLINE_HINT = "the Hugging Face hub is unreachable and it is not in the local cache"

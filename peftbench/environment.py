"""The process a run executes in: device choice, torch threads, seeding, the software environment stored with each
result, and peak-memory sampling.

Example::

    >>> from peftbench.environment import pick_device, seed_everything
    >>> seed_everything(0); pick_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import functools
import os
import platform
import random
import socket
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftbench.engine import cpu_numerics

PACKAGES = ("torch", "transformers", "peft", "datasets", "scikit-learn", "numpy", "pandas", "tokenizers",
            "safetensors")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA if available, else Apple MPS, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


THREADS: dict[str, Any] = {"threads": None, "why": None}  # the choice of set_threads, recorded with every run
BUSY_CORES = 0.75  # cores in use by other processes above which fewer threads are used
BUSY_SAMPLE_S = 0.3  # how long the CPU use of other processes is sampled


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """How many intra-op threads this process should use, and why: ``requested`` (``--threads``) wins, then
    ``OMP_NUM_THREADS``; otherwise the physical cores this process may use, less the cores other processes keep
    busy right now (CPU use sampled for 0.3 s while this process waits, when it is above 0.75 of a core). OpenMP
    threads spinning against another job on the same cores are far slower than fewer threads: on 2 cores beside a
    busy job, 2 threads ran at 7 ex/s and 1 at 81–92 ex/s. (A load average would also count the set-up that just
    ran in the same job, so the instantaneous use is sampled instead.)"""
    if requested:
        return int(requested), "--threads"
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, min(usable, psutil.cpu_count(logical=False) or usable))
    busy = psutil.cpu_percent(interval=BUSY_SAMPLE_S) / 100.0 * (psutil.cpu_count() or cores)
    if busy > BUSY_CORES and cores > 1:
        n = max(1, min(cores, int(round(cores - busy))))
        return n, f"{busy:.2f} of {cores} cores busy with other processes: {n} thread(s) to avoid oversubscription"
    return cores, f"{cores} physical core(s), {busy:.2f} busy with other processes"


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads by :func:`choose_threads` (once per CLI process) and remember the choice for the
    runs' ``environment.threads``. Returns the number in use."""
    n, why = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    THREADS.update(threads=torch.get_num_threads(), why=why)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def environment_base() -> dict[str, Any]:
    """The environment stored with each result: the process's fixed facts, and its thread choice now."""
    return {**_static_environment(), "torch_threads": torch.get_num_threads(), "threads": dict(THREADS)}


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        git_hash = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        git_hash = None
    try:
        versions["peftbench"] = metadata.version("peftbench")
    except metadata.PackageNotFoundError:
        versions["peftbench"] = None
    return {"python": platform.python_version(), "packages": versions, "git_hash": git_hash,
            "hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpu": cpu_numerics()}


class PeakMemory:
    """Peak memory during a block: CUDA max allocated on GPU, else the process RSS sampled every 20 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"

"""Thread choice under a busy CPU (issue 12, point 4): fewer threads when other jobs hold the cores."""

from __future__ import annotations

import os

import pytest

from peftbench import environment
from peftbench.cli import main


@pytest.fixture
def two_cores(monkeypatch):
    import psutil

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    return psutil
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


def test_busy_machine_gets_fewer_threads(two_cores, monkeypatch):
    monkeypatch.setattr(two_cores, "cpu_percent", lambda interval=None: 60.0)  # 1.2 of 2 cores busy
    n, why = environment.choose_threads()
    assert n == 1 and "1.20 of 2 cores busy" in why


def test_idle_machine_gets_every_core(two_cores, monkeypatch):
    monkeypatch.setattr(two_cores, "cpu_percent", lambda interval=None: 5.0)
    assert environment.choose_threads()[0] == 2


def test_requested_threads_win(two_cores, monkeypatch):
    monkeypatch.setattr(two_cores, "cpu_percent", lambda interval=None: 100.0)
    assert environment.choose_threads(2) == (2, "--threads")


def test_bad_thread_count_is_one_line_exit_2(capsys):
    assert main(["run", "--threads", "0", "--no-report"]) == 2
    assert capsys.readouterr().err.strip() == "peftbench: error: --threads: expected an integer >= 1, got 0"

"""The test suite's waits: they end when the condition holds, run as long as something moves, and fail only when
nothing has moved for the stall limit."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from tests import waiting
from tests.waiting import folder_state, run_watched, tree_cpu_ticks, until


@pytest.fixture(autouse=True)
def sample_every_poll(monkeypatch):
    monkeypatch.setattr(waiting, "SAMPLE_SECONDS", 0.0)


def test_a_wait_that_keeps_moving_outlasts_the_stall_limit():
    polls, ticks = itertools.count(), itertools.count()
    # 40 polls of 10 ms each: four times the 0.1 s stall limit, and never stalled.
    assert until(lambda: next(polls) == 40 and "done", lambda: next(ticks), stall_s=0.1, interval=0.01) == "done"


def test_a_wait_that_stops_moving_fails_naming_what_it_waited_for():
    with pytest.raises(AssertionError, match="the thing: nothing moved for 0s"):
        until(lambda: False, lambda: "same", stall_s=0.05, interval=0.01, what="the thing")


def test_a_busy_process_tree_gains_cpu_ticks_and_a_folder_change_shows(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                              "'while True: pass'])"])
    try:
        first = tree_cpu_ticks(child.pid)
        until(lambda: tree_cpu_ticks(child.pid) > first, lambda: None, stall_s=60, what="the grandchild's CPU")
    finally:
        for pid in waiting_descendants(child.pid):
            subprocess.run(["kill", "-9", str(pid)])
        child.kill()
        child.wait()
    before = folder_state(tmp_path)
    (tmp_path / "status.json").write_text("{}")
    assert folder_state(tmp_path) != before


def waiting_descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_run_watched_returns_the_output_and_stops_a_silent_idle_process():
    done = run_watched([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    with pytest.raises(AssertionError, match="nothing moved"):
        run_watched([sys.executable, "-c", "import time; time.sleep(60)"], stall_s=1.0)

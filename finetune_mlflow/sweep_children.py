"""The sweep parent's hold on its child `tune` processes: it starts them, watches them, and ends their runs.

The parent owns every child it starts: when a child process exits without ending its run (killed -9, or dying
before its own handler could run) the parent ends the run with a status and the reason; when the parent itself is
stopped (SIGTERM, Ctrl-C) it launches nothing more, passes SIGTERM on to the running children (each ends its run
KILLED and leaves its job running for a `--run-id` rerun to reattach), and ends whatever they left RUNNING before
its own run ends. A child that another live process still owns (an orphan of a parent killed -9) is watched until
it ends, never launched a second time.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from finetune_mlflow.ownership import me, owner_alive

logger = logging.getLogger(__name__)

# How long stopped children get to end their own runs before the parent kills them and ends the runs itself:
# under a scheduler's grace period (Kubernetes and Slurm default to 30 s).
STOP_GRACE_SECONDS = 10.0


class Stopped(Exception):
    """The parent is stopping: a child not yet launched is not launched."""


def _last_line(log_path: Path) -> str:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1][:300] if lines else "no output"


def exit_reason(code: int, log_path: Path) -> str:
    """Why a child process ended, in words: its signal or exit status and the last line it printed."""
    how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ \
        else f"exited with status {code}"
    return f"tune process {how}: {_last_line(log_path)}"


def end_if_running(client: MlflowClient, run_id: str, status: str, reason: str) -> bool:
    """End a child run the child left RUNNING, with the reason as `finetune.end_reason`; False if it had ended."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, "finetune.end_reason", reason[:5000])
    client.set_terminated(run_id, status)
    logger.warning("ended child run %s %s: %s", run_id, status, reason)
    return True


class Children:
    """The child processes one sweep parent has running, so a stop can reach them from the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen] = {}
        self.stopping = ""

    def run(self, run_id: str, command: list[str], env: dict[str, str], log_path: Path) -> int:
        """Run one child to its end and return its exit status; its run is ended here if it left it RUNNING."""
        with self._lock:
            if self.stopping:
                raise Stopped(self.stopping)
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)
            self._running[run_id] = process
        try:
            code = process.wait()
        finally:
            with self._lock:
                self._running.pop(run_id, None)
        status = RunStatus.to_string(RunStatus.KILLED if code < 0 or self.stopping else RunStatus.FAILED)
        end_if_running(MlflowClient(), run_id, status, exit_reason(code, log_path)
                       + (f"; the sweep parent was stopping ({self.stopping})" if self.stopping else ""))
        return code

    def stop(self, why: str, parent_run_id: str) -> list[str]:
        """Launch nothing more, SIGTERM the running children, give them STOP_GRACE_SECONDS to end their runs,
        then kill what is left and end its runs KILLED. Returns the child run ids that were running."""
        with self._lock:
            self.stopping = why
            running = dict(self._running)
        for process in running.values():
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in running.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
                process.wait()
        client = MlflowClient()
        for run_id in running:
            end_if_running(client, run_id, RunStatus.to_string(RunStatus.KILLED),
                           f"the sweep parent {parent_run_id} was stopped ({why}); the job keeps running: rerun the "
                           f"sweep with --run-id {parent_run_id} to reattach")
        return list(running)


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:  # already gone
        pass


def wait_for_owner(client: MlflowClient, run_id: str, interval: float, say: Callable[[str], None], *,
                   stopped: Callable[[], bool], sleep: Callable[[float], None] = time.sleep) -> None:
    """Watch a child run that another live process owns (an orphan of a parent killed -9) until it ends or its
    owner is gone; launching it again would only be refused as 'in use'."""
    run = client.get_run(run_id)
    if run.info.status != "RUNNING" or not owner_alive(run.data.tags) or run.data.tags.get("finetune.owner") == me():
        return
    say(f"still running in {run.data.tags.get('finetune.owner')} (run {run_id}): watching it")
    while run.info.status == "RUNNING" and owner_alive(run.data.tags) and not stopped():
        sleep(interval)
        run = client.get_run(run_id)

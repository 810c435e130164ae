"""One live process per run, and no child left RUNNING by a process that died.

Every step run records its owner as tags when it starts: `finetune.owner` (`host:pid`) and
`finetune.owner_heartbeat` (epoch seconds, refreshed every HEARTBEAT_SECONDS by a daemon thread). A run resumed with
`--run-id` (MLFLOW_RUN_ID) is claimed before MLflow touches it:

- on this machine, an exclusive `flock` on `<home>/run-locks/<run_id>.lock`, held until the process exits however
  it exits (kill -9 included), makes the claim atomic: a second process on the host fails at once;
- across machines (a shared tracking server), the run's owner tags are the lease: an owner on another host whose
  heartbeat is younger than STALE_SECONDS holds the run. Tags have no compare-and-swap, so two hosts claiming in
  the same instant can both win; the lock file cannot help there (it is per machine) and a tracking server has
  no lock primitive, so this is the closest a plain MLflow server allows.

The loser raises RunHeld (exit 2) naming the holder, having changed nothing on the run. The winner then ends the
run's children that are still RUNNING with no live owner (a kill -9 during prepare or the base evaluation), KILLED
with a `finetune.end_reason`, and says so.

`mlflow run` opens a launcher run in `Default` before the step starts (see `tracking.use_experiment`); the step
owns it too. A kill -9 of the whole `mlflow run` leaves it RUNNING, so every step run that starts ends the stale
launchers it finds with the status of the step run they launched (KILLED when that one never started).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import IO

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.liveness import pid_alive

logger = logging.getLogger(__name__)

OWNER_TAG = "finetune.owner"
HEARTBEAT_TAG = "finetune.owner_heartbeat"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 5 * HEARTBEAT_SECONDS
MAX_MISSED = 5
_HELD: dict[str, IO] = {}  # run id -> its lock file, open (and locked) until this process exits
_BEATING: set[str] = set()


class RunHeld(FinetuneError):
    """Another live process owns the run."""


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def finetune_home() -> Path:
    home = os.environ.get("FINETUNE_MLFLOW_HOME")
    return Path(home) if home else Path.home() / ".cache" / "finetune-mlflow"


def owner_alive(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the owner a run's tags name is still there: on this host its pid is checked; elsewhere its
    heartbeat must be younger than STALE_SECONDS. A run without owner tags has no live owner."""
    owner = tags.get(OWNER_TAG, "")
    host, _, pid = owner.rpartition(":")
    if not host or not pid.isdigit():
        return False
    if host == socket.gethostname():
        return int(pid) == os.getpid() or pid_alive(int(pid))
    try:
        beat = float(tags.get(HEARTBEAT_TAG, "0"))
    except ValueError:
        return False
    return (now or time.time()) - beat < STALE_SECONDS


def _lock(run_id: str) -> None:
    if run_id in _HELD:
        return
    folder = finetune_home() / "run-locks"
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{run_id}.lock", "a+")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process on this machine"
        handle.close()
        raise RunHeld(f"run {run_id} is in use by {holder}; wait for it to end, or stop it, then rerun") from None
    handle.seek(0)
    handle.truncate()
    handle.write(me())
    handle.flush()
    _HELD[run_id] = handle


def claim(run_id: str) -> None:
    """Take the run for this process before anything is written to it, or raise RunHeld."""
    _lock(run_id)
    tags = MlflowClient().get_run(run_id).data.tags
    owner = tags.get(OWNER_TAG, "")
    if owner and owner != me() and owner_alive(tags):
        _HELD.pop(run_id).close()
        raise RunHeld(f"run {run_id} is in use by {owner} (its heartbeat is fresh); wait for it to end, then rerun")


def mark_owner(run_id: str) -> None:
    """Record this process as the run's owner and keep its heartbeat fresh while the process lives."""
    client = MlflowClient()
    client.set_tag(run_id, OWNER_TAG, me())
    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
    if run_id not in _BEATING:
        _BEATING.add(run_id)
        threading.Thread(target=_beat, args=(run_id, mlflow.get_tracking_uri()), daemon=True,
                         name=f"heartbeat-{run_id[:8]}").start()


def _beat(run_id: str, tracking_uri: str) -> None:
    """Refresh the heartbeat until the run ends or changes owner; a store unreachable for MAX_MISSED beats in a
    row ends the beating too (the lease then goes stale, as it should for an owner that cannot write)."""
    client, missed = MlflowClient(tracking_uri), 0
    while missed < MAX_MISSED:
        time.sleep(HEARTBEAT_SECONDS)
        try:
            run = client.get_run(run_id)
            if run.info.status != "RUNNING" or run.data.tags.get(OWNER_TAG) != me():
                break
            client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            missed = 0
        except Exception as e:  # noqa: BLE001 - a missed beat only ages the lease; the next one may succeed
            missed += 1
            logger.debug("heartbeat of run %s failed: %s", run_id, e)
    _BEATING.discard(run_id)


LAUNCHED_INTO_TAG = "finetune.launched_into_experiment"
STEP_RUN_TAG = "finetune.run_id"
MAX_LAUNCHERS_SCANNED = 200


def launcher_end_status(step_status: str | None) -> str:
    """The status a stale launcher ends with: its step run's, once that one has ended; KILLED otherwise (the
    step never started, or it is itself stale and its rerun will end it)."""
    return step_status if step_status in {"FINISHED", "FAILED", "KILLED"} else "KILLED"


def end_stale_launchers(experiment_id: str) -> list[str]:
    """End every launcher run of `mlflow run` in the experiment that is still RUNNING with no live owner; returns
    their ids. Best effort: a launcher is a pointer, and a failure here never stops the step."""
    client = MlflowClient()
    launchers = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{LAUNCHED_INTO_TAG}` "
                                   "LIKE '%'", max_results=MAX_LAUNCHERS_SCANNED)
    ended = []
    for launcher in launchers:
        if owner_alive(launcher.data.tags):
            continue
        step_run_id = launcher.data.tags.get(STEP_RUN_TAG)
        step_status = None
        if step_run_id:
            try:
                step_status = client.get_run(step_run_id).info.status
            except Exception:  # noqa: BLE001 - a deleted step run: the launcher still ends
                step_status = None
        status = launcher_end_status(step_status)
        owner = launcher.data.tags.get(OWNER_TAG, "an unknown process")
        step_run = step_run_id or "(never started)"
        client.set_tag(launcher.info.run_id, "finetune.end_reason",
                       f"stale launcher: left RUNNING by {owner}, which is gone; step run {step_run} is "
                       f"{step_status or 'absent'}; ended by {me()}")
        client.set_terminated(launcher.info.run_id, status)
        logger.info("ended stale launcher run %s %s (its step run %s is %s)", launcher.info.run_id, status,
                    step_run_id or "-", step_status or "absent")
        ended.append(launcher.info.run_id)
    return ended


def end_stale_children(parent_run_id: str) -> list[str]:
    """End KILLED every child of the parent still RUNNING whose owner is gone; returns their ids."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                   f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    ended = []
    for child in children:
        if owner_alive(child.data.tags):
            continue
        step = child.data.tags.get("finetune.step", "?")
        owner = child.data.tags.get(OWNER_TAG, "an unknown process")
        reason = f"stale: left RUNNING by {owner}, which is gone; ended by {me()} rerunning the parent"
        client.set_tag(child.info.run_id, "finetune.end_reason", reason)
        client.set_terminated(child.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        logger.warning("ended stale %s child run %s (left RUNNING by %s, which is gone)", step, child.info.run_id,
                       owner)
        ended.append(child.info.run_id)
    return ended

"""Jobs as directories with a detached trainer process: the shared shell of the providers that train on this
machine (local, transformers), shaped like a cloud tuning service.

A job is `<jobs_dir>/<job_id>/` holding `spec.json` (what to train), `status.json` (atomically replaced),
`events.jsonl` (one metric point per line, appended) and the trainer's pid and lock. The cursor of `read_metrics`
is a byte offset into `events.jsonl`, so a reader never sees an event twice and a rerun of `tune` reattaches to a
job that kept training while nobody watched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator


from finetune_mlflow.errors import ProviderError
from finetune_mlflow.liveness import identity, same_process
from finetune_mlflow.providers.base import MetricPoint, MetricsPage, ProviderBase, TuningJob

logger = logging.getLogger(__name__)

TRAINER_PID = "pid.json"  # written by the trainer that holds the job's lock
LAUNCHER_PID = "launch.json"  # written by start_job for the process it launched
TRAINER_LOCK = "trainer.lock"
RESTARTS = "restarts.json"  # when a dead trainer of this job was relaunched: a list of times
ACTIVE = ("pending", "running")


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)


def launch_trainer(job_dir: Path, module: str) -> int:
    """Start `python -m <module> <job_dir>` detached (its own session: it outlives tune, like a cloud job),
    importing this very copy of the package, logging to `trainer.log`; returns its pid (also in `launch.json`)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with open(job_dir / "trainer.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", module, str(job_dir)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    write_json_atomic(job_dir / LAUNCHER_PID, identity(process.pid) or {"pid": process.pid})
    return process.pid


def jobs_home(folder: str) -> Path:
    """`$FINETUNE_MLFLOW_HOME/<folder>`, else `~/.cache/finetune-mlflow/<folder>`: one home per provider."""
    home = os.environ.get("FINETUNE_MLFLOW_HOME")
    return Path(home) / folder if home else Path.home() / ".cache" / "finetune-mlflow" / folder


def restart_times(job_dir: Path) -> list[float]:
    """When this job's trainer was relaunched (jobs written before the format was shared hold {"count": n})."""
    try:
        recorded = json.loads((job_dir / RESTARTS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return [0.0] * int(recorded["count"]) if isinstance(recorded, dict) else [float(t) for t in recorded]


def stop_leftovers(job_dir: Path, module: str, signum: int = signal.SIGKILL) -> None:
    """Signal every process still working for this job (SIGKILL by default, after its trainer died): workers that
    `accelerate launch` started (each in a session of its own) keep training when the process above them dies. A
    process counts when both the trainer's module and this job's folder are among its arguments (a shell that
    merely lists the folder does not), checked again through a pidfd that pins it, so nothing unrelated is
    touched even if a pid changes hands meanwhile."""
    wanted = {str(job_dir).encode(), module.encode()}

    def works_for_job(proc: Path) -> bool:
        return wanted <= set((proc / "cmdline").read_bytes().split(b"\0"))

    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if int(proc.name) != os.getpid() and works_for_job(proc):
                _signal_pinned(int(proc.name), lambda: works_for_job(proc), signum)


def _signal_pinned(pid: int, still_ours: Callable[[], bool], signum: int) -> bool:
    """Signal `pid` through a pidfd, after `still_ours()` holds for the process the pidfd pins; whether sent."""
    try:
        handle = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not still_ours():
            return False
        signal.pidfd_send_signal(handle, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(handle)


def run_trainer(job_dir: Path, train: Callable[[Path], None]) -> int:
    """The trainer process's shell: take the job's lock (a redundant launch exits), record the pid, run `train`;
    any exception ends as a failed status with its type and message."""
    lock = open(job_dir / TRAINER_LOCK, "a")  # held until this process exits, however it exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another trainer holds this job; exiting", file=sys.stderr)
        return 0
    if json.loads((job_dir / "status.json").read_text(encoding="utf-8"))["state"] in ("succeeded", "failed",
                                                                                 "cancelled"):
        return 0
    write_json_atomic(job_dir / TRAINER_PID, identity(os.getpid()) or {"pid": os.getpid()})
    try:
        train(job_dir)
    except Exception as e:  # noqa: BLE001 - every failure must end as a readable job status
        traceback.print_exc()
        record_failure(job_dir, e)
        return 1
    return 0


def record_failure(job_dir: Path, error: Exception) -> None:
    write_json_atomic(job_dir / "status.json", {
        "state": "failed", "updated": time.time(), "error_code": getattr(error, "error_code", type(error).__name__),
        "error_message": str(error),
    })


class JobDirectoryProvider(ProviderBase):
    """What every job-directory provider does the same way: read status and events, notice a trainer that died
    without a final status and relaunch it (or fail the job), cancel. Subclasses set `jobs_dir` and
    `trainer_module`, and start jobs."""

    jobs_dir: Path
    trainer_module: str
    max_restarts = 3  # a trainer that keeps dying (out of memory, a bug) is a failed job, not a loop
    relaunch_note = "restarted it"  # what a relaunched trainer does, for the log line

    def _read_status(self, job_id: str) -> dict:
        try:
            return json.loads((self._job_dir(job_id) / "status.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProviderError(self.name, f"job {job_id} not found under {self.jobs_dir}; was it started on this "
                                f"machine with the same {self.name}.jobs_dir?", status=404) from None

    def _live_pid(self, job_dir: Path) -> int | None:
        """The pid of the process training (or about to train) the job, if that very process is alive: a
        recorded pid now used by another process (same number, other start time or command line) is not it."""
        for name in (TRAINER_PID, LAUNCHER_PID):
            try:
                recorded = json.loads((job_dir / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(recorded, dict) and same_process(recorded, (self.trainer_module, str(job_dir))):
                return int(recorded["pid"])
        return None

    def _trainer_died(self, job_dir: Path) -> bool:
        """A trainer (or launched process) was recorded and none of them is still that process."""
        recorded = any((job_dir / name).exists() for name in (TRAINER_PID, LAUNCHER_PID))
        return recorded and self._live_pid(job_dir) is None

    def _checked_status(self, job_id: str, restart: bool = True) -> dict:
        """status.json; a trainer found dead without a final status is relaunched (`restart`, at most
        `max_restarts` times), else the status becomes failed with `trainer_died`."""
        job_dir = self._job_dir(job_id)
        status = self._read_status(job_id)
        if status["state"] in ACTIVE and self._trainer_died(job_dir):
            status = self._read_status(job_id)  # it may have written its final status just before exiting
            if status["state"] in ACTIVE:
                restarts = restart_times(job_dir)
                if not restart or len(restarts) >= self.max_restarts:
                    return {"state": "failed", "error_code": "trainer_died", "error_message": (
                        f"the trainer exited without a final status ({len(restarts) + 1} time(s)); see "
                        f"{job_id}/trainer.log in the {self.name} jobs home")}
                return self._relaunch(job_dir, status, len(restarts) + 1)
        return status

    def _relaunch(self, job_dir: Path, status: dict, count: int) -> dict:
        write_json_atomic(job_dir / RESTARTS, restart_times(job_dir) + [time.time()])
        stop_leftovers(job_dir, self.trainer_module)
        status = self._status_for_relaunch(job_dir, status)
        pid = self._launch(job_dir)
        logger.warning("%s job %s: its trainer had died without a final status; %s (pid %d, restart %d of %d)",
                       self.name, job_dir.name, self.relaunch_note, pid, count, self.max_restarts)
        return {**status, "restarts": count}

    def _launch(self, job_dir: Path) -> int:
        """A detached trainer for the job (it records its own pid once it holds the job's lock)."""
        (job_dir / TRAINER_PID).unlink(missing_ok=True)
        pid = launch_trainer(job_dir, self.trainer_module)
        logger.info("%s job %s: trainer started (pid %d, dir %s)", self.name, job_dir.name, pid, job_dir)
        return pid

    def _status_for_relaunch(self, job_dir: Path, status: dict) -> dict:
        """The status a relaunched trainer starts from (a trainer that resumes keeps the current one)."""
        return status

    def cancel_job(self, job_id: str) -> TuningJob:
        """SIGTERM to the trainer, proven to be the job's own process (start time and command line, then held by a
        pidfd so the pid cannot change hands before the signal), and to the processes working for the job; then status
        `cancelled`. A job already ended stays as it is and nothing is signalled."""
        job_dir = self._job_dir(self.check_job_id(job_id))
        if self._read_status(job_id)["state"] not in ACTIVE:
            return self.get_job(job_id)
        pid = self._signal_trainer(job_dir, signal.SIGTERM)
        if pid is not None:
            deadline = time.monotonic() + 10
            while self._live_pid(job_dir) == pid and time.monotonic() < deadline:
                time.sleep(0.05)
        stop_leftovers(job_dir, self.trainer_module)
        status = self._checked_status(job_id, restart=False)
        if status["state"] in ACTIVE or status.get("error_code") == "trainer_died":
            write_json_atomic(job_dir / "status.json", {"state": "cancelled", "updated": time.time(),
                                                        "error_message": "cancelled by finetune-mlflow cancel"})
            logger.info("%s job %s cancelled%s", self.name, job_id, f" (trainer pid {pid} stopped)" if pid else "")
        return self.get_job(job_id)

    def _signal_trainer(self, job_dir: Path, signum: int) -> int | None:
        """Send `signum` to the job's live trainer, then to the processes working for the job (its folder among
        their arguments); the trainer's pid, or None when no live process is proven to be it."""
        pid = self._live_pid(job_dir)
        if pid is None or not _signal_pinned(pid, lambda: self._live_pid(job_dir) == pid, signum):
            return None
        stop_leftovers(job_dir, self.trainer_module, signum)
        return pid

    def _job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _job_for_run(self, run_id: str) -> str | None:
        """A job this run already started (a crash between creating it and tagging the run leaves one behind)."""
        if not self.jobs_dir.exists():
            return None
        for spec_path in sorted(self.jobs_dir.glob("*/spec.json")):
            if json.loads(spec_path.read_text(encoding="utf-8")).get("run_id") == run_id:
                return spec_path.parent.name
        return None

    def read_metrics(self, job_id: str, cursor: str | None) -> MetricsPage:
        path = self._job_dir(job_id) / "events.jsonl"
        offset = int(cursor or 0)
        if not path.exists():
            return MetricsPage([], cursor)
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written is read next time
        points = []
        for line in complete.splitlines():
            event = json.loads(line)
            points.append(MetricPoint(event["key"], float(event["value"]), int(event["step"]), int(event["ts"])))
        return MetricsPage(points, str(offset + len(complete)))

    def list_jobs(self) -> Iterator[str]:
        if self.jobs_dir.exists():
            yield from sorted(p.name for p in self.jobs_dir.iterdir() if (p / "status.json").exists())

"""Jobs as directories with a detached trainer process: the shared shell of the providers that train on this
machine (local, transformers), shaped like a cloud tuning service.

A job is `<jobs_dir>/<job_id>/` holding `spec.json` (what to train), `status.json` (atomically replaced),
`events.jsonl` (one metric point per line, appended) and the trainer's pid and lock. The cursor of `read_metrics`
is a byte offset into `events.jsonl`, so a reader never sees an event twice and a rerun of `tune` reattaches to a
job that kept training while nobody watched.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator


from finetune_mlflow.providers.base import MetricPoint, MetricsPage, ProviderBase

TRAINER_PID = "pid.json"  # written by the trainer that holds the job's lock
LAUNCHER_PID = "launch.json"  # written by start_job for the process it launched
TRAINER_LOCK = "trainer.lock"


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
    write_json_atomic(job_dir / LAUNCHER_PID, {"pid": process.pid})
    return process.pid


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
    write_json_atomic(job_dir / TRAINER_PID, {"pid": os.getpid()})
    try:
        train(job_dir)
    except Exception as e:  # noqa: BLE001 - every failure must end as a readable job status
        traceback.print_exc()
        write_json_atomic(job_dir / "status.json", {
            "state": "failed", "updated": time.time(), "error_code": getattr(e, "error_code", type(e).__name__),
            "error_message": str(e),
        })
        return 1
    return 0


class JobDirectoryProvider(ProviderBase):
    """What every job-directory provider reads the same way; subclasses set `jobs_dir` and start/train jobs."""

    jobs_dir: Path

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

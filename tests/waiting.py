"""Waits that follow progress, not the clock: on a loaded CI machine a healthy job may take minutes, while a stuck
one stops moving. `until` fails only when nothing it watches has changed for `stall_s` seconds: the CPU time of a
process tree (imports and training count, sleeping does not), a job folder's files (status heartbeat, events,
checkpoints, logs), or any other value a test passes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Longest a live process may go without a CPU tick or a written byte before a test calls it stuck: generous,
# since a process waiting on a loaded machine's scheduler still ticks, and a stuck one never does.
STALL_SECONDS = 120.0


# Progress is sampled at most this often (a sample reads /proc and walks folders), however fast `done` is polled.
SAMPLE_SECONDS = 0.5


def until(done: Callable[[], Any], progress: Callable[[], Any], *, stall_s: float = STALL_SECONDS,
          interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `done()` until it returns something truthy (returned); fail when `progress()` stops changing."""
    last, since = progress(), time.monotonic()
    sampled = since
    while True:
        value = done()
        if value:
            return value
        now = time.monotonic()
        if now - sampled >= SAMPLE_SECONDS:
            seen, sampled = progress(), now
            if seen != last:
                last, since = seen, now
            elif now - since > stall_s:
                raise AssertionError(f"{what}: nothing moved for {stall_s:.0f}s (last progress seen: {str(last)[:500]})")
        time.sleep(interval)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is index 0


def tree_cpu_ticks(pid: int) -> int:
    """CPU ticks (user + system) of `pid`, its reaped children and every live descendant: grows while any of them
    runs, which is what a test waiting on them can call progress."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += ticks.get(current, 0)
        stack.extend(child for child, parent in parents.items() if parent == current)
    return total


def folder_state(folder: Path) -> tuple:
    """Every file under `folder` with its size and modification time."""
    found = []
    for path in sorted(folder.rglob("*")) if folder.exists() else []:
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def _recorded_pid(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def job_progress(job_dir: Path) -> Callable[[], tuple]:
    """A background trainer's progress: its folder's files and the CPU of the processes its `launch.json` (the
    launched command) and `pid.json` (the trainer, once it holds the job) name, with their descendants."""
    def progress() -> tuple:
        pids = [pid for pid in (_recorded_pid(job_dir / name) for name in ("launch.json", "pid.json")) if pid]
        return folder_state(job_dir), tuple((pid, tree_cpu_ticks(pid)) for pid in pids)
    return progress


def process_progress(process: subprocess.Popen | int, *files: Path) -> Callable[[], tuple]:
    """A child process's progress: the CPU of its tree and the size of the files it writes (its log)."""
    pid = process if isinstance(process, int) else process.pid

    def progress() -> tuple:
        sizes = tuple(f.stat().st_size if f.exists() else -1 for f in files)
        return tree_cpu_ticks(pid), sizes
    return progress


def run_watched(args: list[str], *, stall_s: float = STALL_SECONDS, **popen: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(args, capture_output=True, text=True, ...)` that is stopped (and fails the test) only when the
    process tree stops using CPU and writing output for `stall_s`, however long a loaded machine makes the run."""
    with tempfile.TemporaryDirectory(prefix="watched-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(args, stdout=stdout, stderr=stderr, start_new_session=True, **popen)
        try:
            until(lambda: process.poll() is not None, process_progress(process, out, err), stall_s=stall_s,
                  interval=0.1, what=f"{' '.join(map(str, args[:4]))}")
        except AssertionError:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        return subprocess.CompletedProcess(args, process.returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))

"""Whether a process of this machine still runs: job trainers (their pid files) and run owners (their tags)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process with that pid
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def identity(pid: int) -> dict | None:
    """What names a process beyond its pid, which the kernel reuses (pid_max is often 32768): its start time and
    command line. None when the process is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        return {"pid": pid, "started": process.create_time(), "cmdline": process.cmdline()}
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def same_process(recorded: dict, markers: tuple[str, ...]) -> bool:
    """Whether the process a pid file recorded still runs as that very process: alive (not a zombie), the same
    start time when one was recorded, and every one of `markers` (the trainer's module, the job's folder) among
    its arguments. A pid reused by an unrelated process fails at least one of these, so it is never signalled."""
    try:
        pid = int(recorded["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0 or not pid_alive(pid):
        return False
    now = identity(pid)
    if now is None or not set(markers) <= set(now["cmdline"]):
        return False
    started = recorded.get("started")
    return not isinstance(started, (int, float)) or abs(float(started) - now["started"]) < 0.05

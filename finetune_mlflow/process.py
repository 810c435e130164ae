"""How an entry-point process ends: every signal whose default action ends the process (SIGTERM, SIGHUP from a
closed terminal or dropped ssh session, SIGQUIT, SIGUSR1...) behaves like Ctrl-C (the runs this process started
end KILLED with the reason, a cloud or local job keeps running and a `--run-id` rerun reattaches), expected
failures print one line and exit 2, and a full disk is reported as such instead of as a page of traceback.
A signal the process inherited as ignored (`nohup` ignores SIGHUP) stays ignored: the caller chose to survive it."""

from __future__ import annotations

import errno
import signal
import sys
from typing import Any, Callable

from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.redaction import redact


# Signals whose default action ends the process (SIGINT already raises KeyboardInterrupt). SIGPIPE is left to
# Python (ignored, a write raises BrokenPipeError); faults (SIGSEGV, SIGBUS, SIGABRT) are not requests to stop.
ENDING_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF",
    "SIGPWR") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """A signal that ends the process (SIGTERM from `timeout`, schedulers and container runtimes; SIGHUP from a
    closed terminal), raised in the main thread."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def _raise_terminated(signum: int, frame: Any) -> None:
    """Raise once: a second signal (a closing terminal sends SIGHUP, then often SIGTERM or SIGCONT) must not
    interrupt the cleanup that ends the runs; SIGKILL still stops a process whose cleanup hangs."""
    for other in ENDING_SIGNALS:
        if signal.getsignal(other) is _raise_terminated:
            signal.signal(other, _note_later)
    raise Terminated(signum)


def _note_later(signum: int, frame: Any) -> None:
    """While the first signal's cleanup runs: later signals are noted, not raised."""
    LATER_SIGNALS.append(signum)


LATER_SIGNALS: list[int] = []


# Runs that could not be ended because the tracking store itself was on the full device.
UNENDED_RUNS: list[str] = []


def disk_full_path(error: BaseException) -> str | None:
    """The path of a 'No space left on device' error anywhere in the exception's chain ('' if none names one),
    or None when the chain holds no such error. A path found anywhere beats a pathless match (the store's own
    "database or disk is full", raised while ending a run, often hides the artifact write that filled the disk)."""
    seen, found = set(), None
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            if error.filename2 or error.filename:  # a copy names its source first, its destination second
                return str(error.filename2 or error.filename)
            found = ""
        elif "No space left on device" in str(error) or "database or disk is full" in str(error):
            found = ""
        error = error.__cause__ or error.__context__
    return found


def _unended_note() -> str:
    """The truth about runs this process could not end (the store did not answer), for the final line."""
    if not UNENDED_RUNS:
        return ""
    return (f"; runs {', '.join(dict.fromkeys(UNENDED_RUNS))} could not be marked ended (the tracking store did not "
            "answer) and show RUNNING until a rerun with --run-id ends them")


def _say(line: str) -> None:
    """One line on stderr; a terminal that is gone (SIGHUP after ssh dropped: EIO, EPIPE) does not turn it into a
    traceback."""
    try:
        print(redact(line), file=sys.stderr, flush=True)
    except OSError:
        pass


def run_guarded(handler: Callable[[], None]) -> int:
    """Run an entry point's handler; map what ends it to an exit status and at most one line on stderr."""
    for signum in ENDING_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, _raise_terminated)
    try:
        handler()
    except FinetuneError as e:
        _say(f"error: {e}{_unended_note()}")
        return 2
    except KeyboardInterrupt as e:
        ended = "; runs ended KILLED" if not UNENDED_RUNS else _unended_note()
        _say(f"error: {e or 'interrupted'}{ended}, a started job keeps running: rerun with --run-id <run> to "
             "reattach")
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - only to recognise a full disk; anything else is re-raised
        where = disk_full_path(e)
        if where is None:
            raise
        unended = (f"; runs {', '.join(UNENDED_RUNS)} could not be marked ended because the tracking store is on "
                   "the full device: free space, then rerun with --run-id (or `mlflow runs` tools) to end them"
                   if UNENDED_RUNS else "")
        print(f"error: no space left on {where or 'the device holding the tracking store or artifacts'}{unended}",
              file=sys.stderr)
        return 2
    return 0

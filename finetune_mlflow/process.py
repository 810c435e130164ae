"""How an entry-point process ends: SIGTERM behaves like Ctrl-C (the runs this process started end KILLED with the
reason, a cloud or local job keeps running and a `--run-id` rerun reattaches), expected failures print one line
and exit 2, and a full disk is reported as such instead of as a page of traceback."""

from __future__ import annotations

import errno
import signal
import sys
from typing import Any, Callable

from finetune_mlflow.errors import FinetuneError


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `timeout`, schedulers and container runtimes) raised in the main thread."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


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


def run_guarded(handler: Callable[[], None]) -> int:
    """Run an entry point's handler; map what ends it to an exit status and at most one line on stderr."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        handler()
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"error: {e or 'interrupted'}; runs ended KILLED, a started job keeps running: rerun with "
              "--run-id <run> to reattach", file=sys.stderr)
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

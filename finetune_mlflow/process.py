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


def disk_full_path(error: BaseException) -> str | None:
    """The path of a 'No space left on device' error anywhere in the exception's chain, '' if it names none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return str(error.filename or "")
        if "No space left on device" in str(error) or "database or disk is full" in str(error):
            return ""
        error = error.__cause__ or error.__context__
    return None


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
        print(f"error: no space left on {where or 'the device holding the tracking store or artifacts'}",
              file=sys.stderr)
        return 2
    return 0

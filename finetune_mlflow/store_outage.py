"""How `tune` waits out a tracking store that stops taking writes while a job streams: retries backed off
(doubling from the poll interval up to MAX_BACKOFF_S), one log line when the outage starts and one when it ends,
and a bound: after MAX_OUTAGE_S without a successful write, or at once for an error no retry can fix (a
read-only database, a permission error), it stops with one error line. The job keeps running either way; a
`--run-id` rerun reattaches. Pure: the caller owns the clock and the logging."""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_BACKOFF_S = 60.0
OUTAGE_ENV = "FINETUNE_MLFLOW_STORE_OUTAGE_S"  # how long an outage may last before tune stops (default 15 min)
MAX_OUTAGE_S = float(os.environ.get(OUTAGE_ENV) or 15 * 60.0)
PERMANENT = ("readonly database", "read-only", "permission denied", "no such table", "unable to open database")


def permanent(message: str) -> bool:
    """An error retrying cannot fix: the store refuses writes for good until someone changes it."""
    lowered = message.lower()
    return any(marker in lowered for marker in PERMANENT)


@dataclass
class Outage:
    """The current run of failed writes: when it started, how many, the next pause."""

    poll_interval: float
    started: float | None = None
    failures: int = 0

    def failed(self, now: float) -> tuple[bool, float]:
        """Record a failed write at `now`: (first failure of this outage, seconds to wait before the next try)."""
        first = self.started is None
        if first:
            self.started = now
        self.failures += 1
        return first, min(MAX_BACKOFF_S, max(self.poll_interval, 0.5) * 2 ** (self.failures - 1))

    def too_long(self, now: float) -> bool:
        return self.started is not None and now - self.started > MAX_OUTAGE_S

    def recovered(self, now: float) -> tuple[int, float] | None:
        """(failures, seconds) of the outage a successful write just ended; None when there was none."""
        if self.started is None:
            return None
        ended = (self.failures, now - self.started)
        self.started, self.failures = None, 0
        return ended

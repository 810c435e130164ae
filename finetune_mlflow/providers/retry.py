"""Bounded retries with backoff that report how long was spent waiting, so latency excludes retry waits.

SDK-internal retries are switched off where we measure latency: they would fold 429 back-off into what looks
like model latency. This helper is shared by every remote provider.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from finetune_mlflow.errors import ProviderError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0


@dataclass(frozen=True)
class Attempted(Generic[T]):
    value: T
    # Duration of the successful attempt alone, in milliseconds (monotonic clock).
    latency_ms: float
    retry_wait_ms: float
    attempts: int


def call_with_retries(
    call: Callable[[], T],
    *,
    classify: Callable[[BaseException], ProviderError | None],
    what: str,
    policy: RetryPolicy = RetryPolicy(),
    retry_after: Callable[[BaseException], float | None] = lambda e: None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Attempted[T]:
    """Run `call`; on an error that `classify` maps to a retryable ProviderError, wait and try again.

    `classify` returns None for errors it does not know (they propagate untouched). When the attempts run out,
    the last ProviderError is raised naming `what` and the last status.
    """
    waited = 0.0
    backoff = policy.initial_backoff_s
    for attempt in range(1, policy.max_attempts + 1):
        started = clock()
        try:
            value = call()
        except Exception as e:  # noqa: BLE001 - classified below, unknown errors re-raised
            error = classify(e)
            if error is None:
                raise
            if not error.retryable or attempt == policy.max_attempts:
                suffix = f" after {attempt} attempts" if attempt > 1 else ""
                raise ProviderError(
                    error.provider,
                    f"{what} failed{suffix}: {error}",
                    status=error.status,
                    request_id=error.request_id,
                    retryable=error.retryable,
                ) from e
            hinted = retry_after(e)
            delay = min(policy.max_backoff_s, hinted if hinted is not None else backoff)
            sleep(delay)
            waited += delay
            backoff *= policy.multiplier
            continue
        return Attempted(value, (clock() - started) * 1000.0, waited * 1000.0, attempt)
    raise AssertionError("unreachable")  # pragma: no cover

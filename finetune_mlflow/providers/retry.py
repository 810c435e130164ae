"""Bounded retries with backoff that report how long was spent waiting, so latency excludes retry waits.

SDK-internal retries are switched off where we measure latency: they would fold 429 back-off into what looks
like model latency. This helper is shared by every remote provider.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

from finetune_mlflow.errors import ProviderError

T = TypeVar("T")


def retry_after_seconds(headers: Mapping[str, str] | None, now: Callable[[], float] = time.time) -> float | None:
    """The wait a server asked for: `retry-after-ms` (OpenAI's), else `retry-after` in seconds or as an HTTP date;
    None when absent or unreadable. Header names are matched case-insensitively."""
    if not headers:
        return None
    lowered = {str(k).lower(): v for k, v in headers.items()}
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lowered.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(str(value))
            if parsed is None:
                continue
            seconds = float(email.utils.mktime_tz(parsed)) - now()
        if seconds == seconds and seconds != float("inf"):  # not NaN nor infinite
            return max(0.0, seconds)
    return None


def error_headers(error: BaseException) -> Mapping[str, str] | None:
    """Response headers of an SDK error (openai's `.response.headers`, google's `.headers` or `.response`)."""
    headers: Any = getattr(error, "headers", None)
    if headers is None:
        headers = getattr(getattr(error, "response", None), "headers", None)
    return headers if hasattr(headers, "items") else None


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

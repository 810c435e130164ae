"""Bounded retries with backoff that report how long was spent waiting, so latency excludes retry waits.

SDK-internal retries are switched off where we measure latency: they would fold 429 back-off into what looks
like model latency. This helper is shared by every remote provider.
"""

from __future__ import annotations

import email.utils
import random
import re
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


RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)s\s*")


def retry_info_seconds(body: Any) -> float | None:
    """The `retryDelay` of a `google.rpc.RetryInfo` among an error body's `error.details` (a protobuf Duration in
    JSON, e.g. "7s" or "0.5s"); None when the body carries none, which is usual for Vertex quota errors."""
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and detail.get("@type") == RETRY_INFO_TYPE:
            match = _DURATION.fullmatch(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
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
    # First wait after a 429 that names no wait (doubling like the other backoff); None: `initial_backoff_s`.
    # A provider whose quota errors carry no Retry-After (Vertex) backs off in seconds here.
    quota_backoff_s: float | None = None
    # Up to this share of random extra on our own backoff (never on a server's hint), so the workers that hit
    # one quota together do not retry in lockstep.
    jitter: float = 0.0


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
    random_share: Callable[[], float] = random.random,
) -> Attempted[T]:
    """Run `call`; on an error that `classify` maps to a retryable ProviderError, wait and try again.

    `classify` returns None for errors it does not know (they propagate untouched). When the attempts run out,
    the last ProviderError is raised naming `what` and the last status.
    """
    waited = 0.0
    backoff = policy.initial_backoff_s
    quota_backoff = policy.initial_backoff_s if policy.quota_backoff_s is None else policy.quota_backoff_s
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
            if hinted is not None:
                delay = min(policy.max_backoff_s, hinted)
            else:
                own = quota_backoff if error.status == 429 else backoff
                delay = min(policy.max_backoff_s, own * (1.0 + policy.jitter * random_share()))
            sleep(delay)
            waited += delay
            backoff *= policy.multiplier
            quota_backoff *= policy.multiplier
            continue
        return Attempted(value, (clock() - started) * 1000.0, waited * 1000.0, attempt)
    raise AssertionError("unreachable")  # pragma: no cover

"""The `together` client and every call through it: credentials from TOGETHER_API_KEY (never stored), the
SDK's own retries switched off so 429/5xx/reset back-off is ours (bounded, honouring Retry-After, reported apart
from latency), and SDK errors turned into ProviderError with status, request id and whether a retry helps."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable, TypeVar

import together

from finetune_mlflow.errors import ConfigError, ProviderError
from finetune_mlflow.providers.retry import (
    Attempted,
    RetryPolicy,
    call_with_retries,
    error_headers,
    retry_after_seconds,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
PROVIDER = "together"
RETRYABLE = frozenset({408, 409, 429})
KEY_ENV = "TOGETHER_API_KEY"
URL_ENV = "TOGETHER_BASE_URL"
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")


def api_key_from_env() -> str:
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise ConfigError(f"{KEY_ENV} is not set: the together provider needs an API key in the environment "
                          f"(export {KEY_ENV}=... in the shell that runs mlflow; keys never go in config files)")
    return key


def redact(text: str, secret: str) -> str:
    return _BEARER.sub(r"\1***", text.replace(secret, "***") if secret else text)


class Transport:
    """One Together client plus the retry policy for management calls and for chat requests."""

    def __init__(self, config: Any, *, sleep: Callable[[float], None] = time.sleep,
                 retry_policy: RetryPolicy | None = None):
        settings = config.together
        self._key = api_key_from_env()
        base_url = settings.base_url or None  # None: the SDK reads TOGETHER_BASE_URL, else api.together.ai
        try:
            self.client = together.Together(api_key=self._key, base_url=base_url, max_retries=0,
                                            timeout=settings.request_timeout_seconds)
        except together.TogetherError as e:
            raise ConfigError(f"cannot build the Together client: {redact(str(e), self._key)}") from None
        source = "config together.base_url" if base_url else (f"env {URL_ENV}" if os.environ.get(URL_ENV)
                                                               else "SDK default")
        log.info("Together credentials: api key from env %s; base_url %s (%s)", KEY_ENV,
                 str(self.client.base_url).split("?")[0], source)
        self._sleep = sleep
        backoff = config.evaluate.retry_backoff_seconds
        self.management = retry_policy or RetryPolicy(max_attempts=settings.max_retries + 1,
                                                      initial_backoff_s=backoff)
        self.prediction = retry_policy or RetryPolicy(max_attempts=config.evaluate.request_retries + 1,
                                                      initial_backoff_s=backoff)

    def classify(self, error: BaseException) -> ProviderError | None:
        if isinstance(error, together.APITimeoutError):
            return ProviderError(PROVIDER, "request timed out", retryable=True)
        if isinstance(error, together.APIConnectionError):
            return ProviderError(PROVIDER, f"connection error ({redact(str(error), self._key)})", retryable=True)
        if isinstance(error, together.APIStatusError):
            status = error.status_code
            body = error.body if isinstance(error.body, dict) else {}
            inner = body.get("error") if isinstance(body.get("error"), dict) else body
            said = inner.get("message") if isinstance(inner.get("message"), str) else str(error.message)
            message = redact(said, self._key)
            if status == 401:
                message += f" (check {KEY_ENV})"
            request_id = error.response.headers.get("x-request-id") if error.response is not None else None
            return ProviderError(PROVIDER, f"HTTP {status}: {message}", status=status, request_id=request_id,
                                 retryable=status in RETRYABLE or status >= 500)
        return None

    def call(self, what: str, call: Callable[[], T], *, predict: bool = False) -> Attempted[T]:
        return call_with_retries(call, classify=self.classify, what=what,
                                 policy=self.prediction if predict else self.management,
                                 retry_after=lambda e: retry_after_seconds(error_headers(e)), sleep=self._sleep)

    def value(self, what: str, call: Callable[[], T]) -> T:
        return self.call(what, call).value

    def close(self) -> None:
        self.client.close()

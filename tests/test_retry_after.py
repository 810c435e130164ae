"""One Retry-After reader for every provider: the header forms servers send, and what is ignored."""

from __future__ import annotations

import email.utils

import pytest

from finetune_mlflow.providers.retry import retry_after_seconds, retry_info_seconds

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "3"}, 3.0),
    ({"Retry-After": "0.5"}, 0.5),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # OpenAI's millisecond header wins
    ({"retry-after": email.utils.formatdate(NOW + 7, usegmt=True)}, 7.0),
    ({"retry-after": email.utils.formatdate(NOW - 60, usegmt=True)}, 0.0),  # a date in the past: no wait
    ({"retry-after": "-4"}, 0.0),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after-ms": "x", "retry-after": "2"}, 2.0),
    ({}, None),
    (None, None),
])
def test_retry_after_header_forms(headers, expected):
    assert retry_after_seconds(headers, now=lambda: NOW) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("body, expected", [
    ({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}, 7.0),
    ({"error": {"details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED"},
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.250s"}]}}, 0.25),
    ({"error": {"code": 429, "message": "Resource exhausted.", "status": "RESOURCE_EXHAUSTED"}}, None),  # usual
    ({"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "soon"}]}}, None),
    ({"error": {"details": "not a list"}}, None),
    ([{"error": {}}], None),
    (None, None),
])
def test_retry_info_in_google_error_bodies(body, expected):
    assert retry_info_seconds(body) == expected

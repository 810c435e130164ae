"""What one request to a served model may ask for, checked before any work: a served version answers a caller it
does not know, so the cost of one request is bounded by these documented limits (README, "Serving a version")
and anything past them is a 400 that names the row, the field and the limit.

Pure: no MLflow, no provider; `qa_model` turns a RequestRefused into MLflow's invalid-parameter error (HTTP 400).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

MAX_ROWS = 1_000  # questions per request
MAX_CONTEXT_CHARS = 1_000_000  # one context (SQuAD passages are under 4,000)
MAX_QUESTION_CHARS = 10_000
MAX_REQUEST_CHARS = 5_000_000  # all questions and contexts of one request together
FIELDS = ("question", "context")
LIMITS = {"question": MAX_QUESTION_CHARS, "context": MAX_CONTEXT_CHARS}


class RequestRefused(ValueError):
    """The request is malformed or larger than the limits; the message says which row, field and limit."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def question_pairs(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[tuple[str, str]]:
    """(question, context) pairs of a request whose `rows` hold the `FIELDS` columns in that order; every value
    must be a string (a null is not the text "None") within the limits."""
    missing = set(FIELDS) - set(columns)
    if missing:
        raise RequestRefused(f"input needs columns question and context; missing {', '.join(sorted(missing))}")
    if len(rows) > MAX_ROWS:
        raise RequestRefused(f"{len(rows)} rows in one request; at most {MAX_ROWS} (split the request)")
    pairs, total = [], 0
    for number, row in enumerate(rows):
        for field, value in zip(FIELDS, row):
            if _missing(value):
                raise RequestRefused(f"row {number}: {field} is null; expected text")
            if not isinstance(value, str):
                raise RequestRefused(f"row {number}: {field} is a {type(value).__name__}; expected text")
            if len(value) > LIMITS[field]:
                raise RequestRefused(f"row {number}: {field} has {len(value):,} characters; at most "
                                     f"{LIMITS[field]:,}")
            total += len(value)
        if total > MAX_REQUEST_CHARS:
            raise RequestRefused(f"the request's questions and contexts pass {MAX_REQUEST_CHARS:,} characters at "
                                 f"row {number}; send fewer rows per request")
        pairs.append((row[0], row[1]))
    return pairs

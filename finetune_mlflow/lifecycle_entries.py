"""Pure: the dated lifecycle entries of an experiment YAML (`lifecycle.models.<model>`), checked when the config
loads. An entry states what a provider published and when it was read, so a date is never guessed or written in
code:

    lifecycle:
      models:
        gpt-4o-mini-2024-07-18:
          shutdown_date: 2027-01-14
          new_jobs: closed
          source: https://platform.openai.com/docs/deprecations (notice of 2026-05-07)
          as_of: 2026-12-01
"""

from __future__ import annotations

import datetime as dt
from typing import Mapping

ENTRY_KEYS = {"shutdown_date", "source", "as_of", "stage", "new_jobs"}
REQUIRED_KEYS = ("shutdown_date", "source", "as_of")
NEW_JOBS = {"open": True, "closed": False}


def parse_date(value: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        return None


def lifecycle_entry_problem(entry: Mapping[str, str]) -> str | None:
    """What is wrong with one dated config entry (with the fix), or None."""
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        return f"unknown key {unknown[0]!r}; expected some of {', '.join(sorted(ENTRY_KEYS))}"
    missing = [key for key in REQUIRED_KEYS if not str(entry.get(key, "")).strip()]
    if missing:
        return (f"missing {', '.join(missing)}: a lifecycle entry says the date, where it was published (source) "
                "and when that source was read (as_of)")
    for key in ("shutdown_date", "as_of"):
        if parse_date(entry[key]) is None:
            return f"{key} {entry[key]!r} is not a date; write YYYY-MM-DD"
    if "new_jobs" in entry and entry["new_jobs"] not in NEW_JOBS:
        return f"new_jobs {entry['new_jobs']!r} is not one of open, closed"
    return None



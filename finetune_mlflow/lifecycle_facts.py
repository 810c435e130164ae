"""Pure rules about model lifecycles: dated config entries, the tags a run and a registered version carry, the
warning and the promotion gate. No MLflow and no network here (the shells are `lifecycle_record` and
`steps/lifecycle`).

A dated entry (`lifecycle.models.<model>` in an experiment YAML) states what a provider published and when it was
read, so a date is never guessed or written in code:

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

from finetune_mlflow.providers.base import ModelLifecycle

ENTRY_KEYS = {"shutdown_date", "source", "as_of", "stage", "new_jobs"}
REQUIRED_KEYS = ("shutdown_date", "source", "as_of")
NEW_JOBS = {"open": True, "closed": False}

# Tags on a run and on a registered version.
SHUTDOWN_TAG = "finetune.shutdown_date"
STAGE_TAG = "finetune.lifecycle_stage"
CHECKED_TAG = "finetune.lifecycle_checked_at"
SOURCE_TAG = "finetune.lifecycle_source"
MODEL_TAG = "finetune.lifecycle_model"
NEW_JOBS_TAG = "finetune.lifecycle_new_jobs"
UNKNOWN = "unknown"


def _date(value: str) -> dt.date | None:
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
        if _date(entry[key]) is None:
            return f"{key} {entry[key]!r} is not a date; write YYYY-MM-DD"
    if "new_jobs" in entry and entry["new_jobs"] not in NEW_JOBS:
        return f"new_jobs {entry['new_jobs']!r} is not one of open, closed"
    return None


def from_entry(model: str, entry: Mapping[str, str], checked_at: dt.datetime) -> ModelLifecycle:
    """A validated dated entry as a lifecycle; its source names the config and the day it was read."""
    return ModelLifecycle(model=model, shutdown_date=_date(entry["shutdown_date"]), stage=entry.get("stage") or None,
                          accepts_new_jobs=NEW_JOBS.get(entry.get("new_jobs", "")),
                          source=f"config lifecycle.models ({entry['source']}, as of {entry['as_of']})",
                          checked_at=checked_at)


def soonest(*facts: ModelLifecycle | None) -> ModelLifecycle | None:
    """The lifecycle that ends first (a tuned model stops when its base does); a known date beats none."""
    known = [f for f in facts if f is not None]
    if not known:
        return None
    dated = [f for f in known if f.shutdown_date is not None]
    return min(dated, key=lambda f: f.shutdown_date) if dated else known[0]


def to_tags(facts: ModelLifecycle | None, checked_at: dt.datetime) -> dict[str, str]:
    """The tags a run and a version carry; a lookup that found nothing is recorded as such, with its time."""
    if facts is None:
        return {SHUTDOWN_TAG: UNKNOWN, CHECKED_TAG: checked_at.isoformat(timespec="seconds")}
    return {SHUTDOWN_TAG: facts.shutdown_date.isoformat() if facts.shutdown_date else UNKNOWN,
            STAGE_TAG: facts.stage or UNKNOWN, CHECKED_TAG: facts.checked_at.isoformat(timespec="seconds"),
            SOURCE_TAG: facts.source[:500], MODEL_TAG: facts.model,
            NEW_JOBS_TAG: {True: "open", False: "closed", None: UNKNOWN}[facts.accepts_new_jobs]}


def shutdown_from_tags(tags: Mapping[str, str]) -> dt.date | None:
    return _date(tags.get(SHUTDOWN_TAG, ""))


def days_left(shutdown: dt.date | None, today: dt.date) -> int | None:
    return None if shutdown is None else (shutdown - today).days


def retiring_warning(what: str, tags: Mapping[str, str], today: dt.date, warn_days: int) -> str | None:
    """The log line for a version whose model shuts down within `warn_days` (or already has), else None."""
    left = days_left(shutdown_from_tags(tags), today)
    if left is None or left > warn_days:
        return None
    model = tags.get(MODEL_TAG) or "its model"
    when = f"shut down {-left} day(s) ago" if left < 0 else f"shuts down in {left} day(s)"
    return (f"{what}: {model} {when} ({tags[SHUTDOWN_TAG]}, per {tags.get(SOURCE_TAG, 'the recorded lifecycle')}); "
            "plan its replacement: mlflow run . -e migrate -P config=experiments/<migration>.yaml")


def shutdown_gate(tags: Mapping[str, str], today: dt.date, min_days: int) -> str | None:
    """Why a candidate may not become champion (it shuts down within `min_days`), or None."""
    left = days_left(shutdown_from_tags(tags), today)
    if left is None or left >= min_days:
        return None
    return (f"its model {tags.get(MODEL_TAG) or ''} shuts down on {tags[SHUTDOWN_TAG]}, {left} day(s) from today, "
            f"within promotion.min_days_to_shutdown {min_days}").replace("model  ", "model ")

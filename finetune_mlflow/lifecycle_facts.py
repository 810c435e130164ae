"""Pure rules about model lifecycles: the tags a run and a registered version carry, the
warning and the promotion gate. No MLflow and no network here (the shells are `lifecycle_record` and
`steps/lifecycle`).

Dated config entries are read by `lifecycle_entries`.
"""

from __future__ import annotations

import datetime as dt
from typing import Mapping

from finetune_mlflow.lifecycle_entries import NEW_JOBS, parse_date as _date
from finetune_mlflow.providers.base import ModelLifecycle

# Tags on a run and on a registered version.
SHUTDOWN_TAG = "finetune.shutdown_date"
STAGE_TAG = "finetune.lifecycle_stage"
CHECKED_TAG = "finetune.lifecycle_checked_at"
SOURCE_TAG = "finetune.lifecycle_source"
MODEL_TAG = "finetune.lifecycle_model"
NEW_JOBS_TAG = "finetune.lifecycle_new_jobs"
UNKNOWN = "unknown"


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


def keeps_recorded(recorded: Mapping[str, str], fresh: Mapping[str, str]) -> bool:
    """A refresh that learnt no date keeps a recorded one: a model that shut down answers 404 to the lookup too,
    and its date is exactly what must not be lost."""
    return shutdown_from_tags(fresh) is None and shutdown_from_tags(recorded) is not None


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

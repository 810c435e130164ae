"""OpenAI model lifecycle: `GET /v1/models/{id}` (the SDK's `Model.shutdown_date`) for a tuned model or its base
snapshot, and the reading of a refused job creation (403 `training_not_available` and its kin) as "fine-tuning is
closed". Pure functions plus the provider's thin calls; no date lives here."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Callable

from finetune_mlflow.errors import ProviderError, TrainingClosed
from finetune_mlflow.providers.base import ModelLifecycle

logger = logging.getLogger(__name__)

SOURCE = "openai:models.retrieve"


def parse_shutdown_date(value: Any) -> dt.date | None:
    """`shutdown_date` as the API gives it: an ISO date or datetime, or Unix seconds; None when absent or unreadable."""
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.isdigit()):
        return dt.datetime.fromtimestamp(int(value), dt.timezone.utc).date()
    text = str(value).strip()
    try:
        return dt.date.fromisoformat(text[:10])
    except ValueError:
        logger.warning("OpenAI reported shutdown_date %r, which is not a date; ignored", text[:100])
        return None


def from_model(model_id: str, model: Any, checked_at: dt.datetime) -> ModelLifecycle:
    """The SDK `Model` as a lifecycle: OpenAI reports a date only (no stage, no word on new jobs)."""
    shutdown = parse_shutdown_date(getattr(model, "shutdown_date", None))
    stage = None
    if shutdown is not None:
        stage = "retired" if shutdown <= checked_at.date() else "deprecated"
    return ModelLifecycle(model=model_id, shutdown_date=shutdown, stage=stage, accepts_new_jobs=None,
                          source=SOURCE, checked_at=checked_at)


def retrieve(model_id: str, call: Callable[[], Any]) -> ModelLifecycle | None:
    """`call` is the provider's retried `models.retrieve`; a 404 (a model OpenAI no longer lists) is None."""
    try:
        model = call()
    except ProviderError as e:
        if e.status == 404:
            return None
        raise
    return from_model(model_id, model, dt.datetime.now(dt.timezone.utc))


def refused_creation(error: ProviderError, base_model: str) -> TrainingClosed | None:
    """A 403 on job creation as `TrainingClosed` with the server's code and message; None for other errors."""
    if error.status != 403:
        return None
    body = getattr(error.__cause__, "body", None)
    body = body if isinstance(body, dict) else {}
    code = body.get("code") or "permission_denied"
    message = str(body.get("message") or "").replace("\n", " ")[:300]
    return TrainingClosed("openai", base_model, f"403 {code}: {message}" if message else f"403 {code}",
                          status=403, request_id=error.request_id)


def discard_uploads(delete: Callable[[str], Any], file_ids: list[str]) -> None:
    """Delete the files uploaded for a job that was refused, so a refusal leaves nothing behind."""
    for file_id in file_ids:
        try:
            delete(file_id)
        except Exception as e:  # noqa: BLE001 - best effort; the refusal is the error to report
            logger.warning("could not delete uploaded file %s after the refusal: %s", file_id, e)

"""Pure: a model's lifecycle as Together's model catalog reports it (`GET /v2/supported-models`, the SDK's
`models.list_supported`): a status word (recommended, supported, deprecated, hidden) and the products the model is
offered for. The catalog gives no shutdown date, so none is ever set here."""

from __future__ import annotations

import datetime as dt
from typing import Any

from finetune_mlflow.providers.base import ModelLifecycle

SOURCE = "together:models.list_supported (/v2/supported-models)"
STATUS_PREFIX = "SUPPORTED_MODEL_STATUS_"
FINE_TUNING = "PRODUCT_FINE_TUNING"


def matches(entry: Any, model: str) -> bool:
    """The catalog entry for `model`: by its inference name (the Hugging Face id) or its catalog id."""
    return model in (entry.name, entry.id)


def from_catalog(entry: Any, model: str, checked_at: dt.datetime) -> ModelLifecycle:
    status = str(entry.status or "")
    products = [str(p) for p in (entry.products or [])]
    return ModelLifecycle(model=model, shutdown_date=None, stage=status.removeprefix(STATUS_PREFIX).lower() or None,
                          accepts_new_jobs=FINE_TUNING in products, source=SOURCE, checked_at=checked_at)

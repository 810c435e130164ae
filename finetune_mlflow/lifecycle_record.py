"""Model lifecycle on runs and registered versions: ask the provider (else a dated config entry), record the
answer as tags, refuse to launch on a model closed to new jobs, and log the retiring-model warning.

Tags (run and version): see `lifecycle_facts` (`finetune.shutdown_date`, `finetune.lifecycle_stage`,
`finetune.lifecycle_checked_at`, `finetune.lifecycle_source`, `finetune.lifecycle_model`). A lookup that fails is
a warning, never a failed tune: the date is then recorded as unknown.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Mapping

from finetune_mlflow.config import Config
from finetune_mlflow.errors import FinetuneError, TrainingClosed
from finetune_mlflow.lifecycle_facts import from_entry, retiring_warning, soonest, to_tags
from finetune_mlflow.providers.base import ModelLifecycle, Provider

logger = logging.getLogger(__name__)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def today() -> dt.date:
    return now().date()


def model_lifecycle(provider: Provider, model: str, config: Config) -> ModelLifecycle | None:
    """What the provider reports for `model`; where it reports nothing, the config's dated entry."""
    try:
        reported = provider.lifecycle(model)
    except FinetuneError as e:
        logger.warning("could not read the lifecycle of %s from %s: %s", model, provider.name, e)
        reported = None
    if reported is not None and reported.shutdown_date is not None:
        return reported
    entry = config.lifecycle.models.get(model) or config.lifecycle.models.get(model.rsplit("/", 1)[-1])
    return from_entry(model, entry, now()) if entry else reported


def version_lifecycle(provider: Provider, tuned_model: str, base_model: str, config: Config,
                      version_ref: str = "") -> ModelLifecycle | None:
    """A tuned model's lifecycle: its own, its base model's, or a dated entry for the registered version itself
    (`models:/<name>/<version>`, e.g. a self-hosted deployment a platform team retires), whichever ends first."""
    tuned = model_lifecycle(provider, tuned_model, config) if tuned_model else None
    base = model_lifecycle(provider, base_model, config) if base_model and base_model != tuned_model else None
    entry = config.lifecycle.models.get(version_ref) if version_ref else None
    return soonest(tuned, base, from_entry(version_ref, entry, now()) if entry else None)


def lifecycle_tags(provider: Provider, tuned_model: str, base_model: str, config: Config,
                   version_ref: str = "") -> dict[str, str]:
    return to_tags(version_lifecycle(provider, tuned_model, base_model, config, version_ref), now())


def check_accepts_jobs(provider: Provider, base_model: str, config: Config) -> None:
    """Refuse before any upload when the provider (or a dated entry) says the model takes no new jobs."""
    facts = model_lifecycle(provider, base_model, config)
    if facts is not None and facts.accepts_new_jobs is False:
        raise TrainingClosed(provider.name, base_model, f"per {facts.source}")
    if facts is not None and facts.shutdown_date is not None and facts.shutdown_date <= today():
        raise TrainingClosed(provider.name, base_model, f"it shut down on {facts.shutdown_date}, per {facts.source}")


def warn_if_retiring(what: str, tags: Mapping[str, str], warn_days: int) -> str | None:
    """Log (never raise) the warning for a version whose model shuts down within `warn_days`."""
    line = retiring_warning(what, tags, today(), warn_days)
    if line:
        logger.warning(line)
    return line

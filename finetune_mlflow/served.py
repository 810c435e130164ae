"""What a registered version answers with, read from the files it ships: `serving.json` (provider, model id, the
provider's non-secret settings) and the model files it carries (local weights, a merged transformers model).

Shared by the pyfunc (`qa_model`, when a version is served) and by `evaluate models:/...`, which needs only the
provider and the model id: reading the version's MLmodel and its `artifacts/` folder skips what a pyfunc load
adds (the whole model folder with its code copy, the model-from-code import, MLflow's environment checks) and
works wherever the version's artifacts can be downloaded (a team server, no jobs folder needed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.models import Model

from finetune_mlflow.config import Config, load_config
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.providers import get_provider, provider_class
from finetune_mlflow.providers.base import MODEL_ARTIFACT

if TYPE_CHECKING:
    from finetune_mlflow.providers.base import Provider

logger = logging.getLogger(__name__)

SERVING_ARTIFACT = "serving"  # JSON: provider, model id and non-secret settings
PYFUNC = "python_function"
# Comma-separated endpoints the user consents to send credentials to when a version stored one of them.
TRUSTED_ENDPOINTS_ENV = "FINETUNE_MLFLOW_TRUSTED_ENDPOINTS"


def _same_endpoint(a: str, b: str) -> bool:
    return a.strip().rstrip("/").lower() == b.strip().rstrip("/").lower()


def endpoint_settings(name: str, stored: dict, user: Config, reference: str = "the version") -> dict[str, str]:
    """The endpoint settings a version's provider is built with. The user's config and environment decide where
    their credentials go: a version's stored endpoint is used only when it is the same place, or when the user
    named it in FINETUNE_MLFLOW_TRUSTED_ENDPOINTS; any other stored endpoint is refused, never silently used."""
    trusted = [u for u in os.environ.get(TRUSTED_ENDPOINTS_ENV, "").split(",") if u.strip()]
    chosen = {}
    for key, mine in provider_class(name).endpoints(user).items():
        section, _, field = key.partition(".")
        theirs = str(stored.get(key) or "")
        chosen[key] = getattr(getattr(user, section), field)
        if not theirs or _same_endpoint(theirs, mine):
            continue
        if any(_same_endpoint(theirs, u) for u in trusted):
            logger.warning("%s: using its stored %s %s (trusted through %s) instead of %s", reference, key, theirs,
                           TRUSTED_ENDPOINTS_ENV, mine)
            chosen[key] = theirs
            continue
        raise ConfigError(
            f"{reference} was registered with {key} {theirs}, but your config and environment send {name} "
            f"credentials to {mine}; refusing to send them to the stored endpoint. Set {key} (or its environment "
            f"variable) to the endpoint you mean, or consent to the stored one with {TRUSTED_ENDPOINTS_ENV}={theirs}")
    return chosen


def served_model(settings: dict, shipped: str | None, user: Config | None = None,
                 reference: str = "the version") -> tuple[str, "Provider"]:
    """(model id, provider) of a version: its provider rebuilt from the version's own settings, except where
    credentials go, which the user's config (`user`; the defaults under `mlflow models serve`) and environment
    decide (`endpoint_settings`); the model it ships (`shipped`, a local path) located where it lies."""
    name = settings["provider"]
    stored = settings.get("provider_settings", {})
    overrides = {**stored, **endpoint_settings(name, stored, user or load_config(None), reference),
                 "provider": name}
    model_id = settings["model_id"]
    if shipped:
        model_id, located = provider_class(name).model_from_artifact(shipped)
        overrides.update(located)
    return model_id, get_provider(name, load_config(None, overrides))


def load_version(model_uri: str, destination: Path, user: Config | None = None) -> tuple[str, "Provider"] | None:
    """(model id, provider) of the pyfunc at `model_uri` (`models:/...`, `runs:/<id>/model`) from its MLmodel and
    the artifacts it names, downloaded under `destination`; None for a version without `serving.json` (logged
    by an older release: load it as a pyfunc)."""
    artifacts = Model.load(model_uri).flavors.get(PYFUNC, {}).get("artifacts") or {}
    paths = {name: entry["path"] for name, entry in artifacts.items()}
    if SERVING_ARTIFACT not in paths:
        return None
    roots = {}  # each top folder (`artifacts`) in one download; a `runs:/` URI keeps its path prefix on disk
    for folder in sorted({path.split("/")[0] for path in paths.values()}):
        downloaded = mlflow.artifacts.download_artifacts(f"{model_uri}/{folder}", dst_path=str(destination))
        roots[folder] = Path(downloaded).parent
    local = {name: roots[path.split("/")[0]] / path for name, path in paths.items()}
    settings = json.loads(local[SERVING_ARTIFACT].read_text(encoding="utf-8"))
    shipped = local.get(MODEL_ARTIFACT)
    return served_model(settings, str(shipped) if shipped else None, user, model_uri)

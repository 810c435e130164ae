"""What a registered version answers with, read from the files it ships: `serving.json` (provider, model id, the
provider's non-secret settings) and the model files it carries (local weights, a merged transformers model).

Shared by the pyfunc (`qa_model`, when a version is served) and by `evaluate models:/...`, which needs only the
provider and the model id: reading the version's MLmodel and its `artifacts/` folder skips what a pyfunc load
adds (the whole model folder with its code copy, the model-from-code import, MLflow's environment checks) and
works wherever the version's artifacts can be downloaded (a team server, no jobs folder needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.models import Model

from finetune_mlflow.config import load_config
from finetune_mlflow.providers import get_provider, provider_class
from finetune_mlflow.providers.base import MODEL_ARTIFACT

if TYPE_CHECKING:
    from finetune_mlflow.providers.base import Provider

SERVING_ARTIFACT = "serving"  # JSON: provider, model id and non-secret settings
PYFUNC = "python_function"


def served_model(settings: dict, shipped: str | None) -> tuple[str, "Provider"]:
    """(model id, provider) of a version: its provider rebuilt from the version's own settings (credentials come
    from the environment), the model it ships (`shipped`, a local path) located where it lies."""
    name = settings["provider"]
    overrides = {**settings.get("provider_settings", {}), "provider": name}
    model_id = settings["model_id"]
    if shipped:
        model_id, located = provider_class(name).model_from_artifact(shipped)
        overrides.update(located)
    return model_id, get_provider(name, load_config(None, overrides))


def load_version(model_uri: str, destination: Path) -> tuple[str, "Provider"] | None:
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
    return served_model(settings, str(shipped) if shipped else None)

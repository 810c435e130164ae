"""Register winners, not every trial: a search's trials register their models under `<registered_model_name>-trials`
(TRIALS_SUFFIX), so every trial's model stays loadable and comparable, and only the trial the search recommends is
registered under the production name: a version of `tune.registered_model_name` made from the same logged model,
with the trial version's tags and description. Once per run: a rerun finds the version it made."""

from __future__ import annotations

import logging

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.registry import RegisteredVersion, existing_version

logger = logging.getLogger(__name__)

TRIALS_SUFFIX = "-trials"
REGISTERED_TAG = "finetune.registered_version"


def trials_name(production: str) -> str:
    return f"{production}{TRIALS_SUFFIX}"


def register_chosen(run_id: str, production: str) -> RegisteredVersion | None:
    """The chosen trial's model as a version of `production`; None when the trial registered nothing."""
    client = MlflowClient()
    name, _, version = client.get_run(run_id).data.tags.get(REGISTERED_TAG, "").partition("/")
    if not version:
        return None
    found = existing_version(client, production, run_id)
    if found is not None:
        return found
    trial = client.get_model_version(name, version)
    try:
        client.create_registered_model(production, description=client.get_registered_model(name).description)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    made = client.create_model_version(production, trial.source, run_id=run_id, tags=trial.tags,
                                       description=trial.description, model_id=getattr(trial, "model_id", None))
    logger.info("registered the chosen trial (run %s, %s version %s) as %s version %s", run_id, name, version,
                production, made.version)
    return RegisteredVersion(production, made.version, f"models:/{production}/{made.version}")

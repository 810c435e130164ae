"""Log the tuned model as a servable pyfunc and register it, at most once per run (safe to call again)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_NAME_IN_RUN = "model"
EXAMPLE_INPUT = pd.DataFrame({
    "question": ["Which city is the capital of Poland?"],
    "context": ["Warsaw is the capital and largest city of Poland."],
})


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str


def provider_settings(config: Config, provider: str) -> dict:
    """The provider's non-secret settings as `section.key` overrides, so serving rebuilds the same client."""
    settings = {f"{provider}.{k}": v for k, v in dataclasses.asdict(getattr(config, provider)).items()}
    settings["evaluate.max_output_tokens"] = config.evaluate.max_output_tokens
    settings["evaluate.request_retries"] = config.evaluate.request_retries
    settings["evaluate.retry_backoff_seconds"] = config.evaluate.retry_backoff_seconds
    return settings


# What the served model imports (the package itself travels as code_paths): the providers' SDKs and their data
# stack. Pinned to the installed versions, as MLflow's own inference would pin them.
SERVING_DISTRIBUTIONS = ("mlflow", "numpy", "pandas", "pyyaml", "openai", "google-genai", "google-auth",
                         "google-api-core", "google-cloud-storage")


def serving_requirements() -> list[str]:
    found = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


class _PyfuncFlavor:
    """mlflow.pyfunc as a `Model.log` flavor: `Model.log` reads `validate_serving_input` from the keyword
    arguments it hands to the flavor's save_model, which pyfunc's refuses; dropped here."""

    @staticmethod
    def save_model(*, validate_serving_input: bool = True, **kwargs) -> None:
        mlflow.pyfunc.save_model(**kwargs)


def existing_version(client: MlflowClient, name: str, run_id: str) -> RegisteredVersion | None:
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    first = min(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, first.version, f"models:/{name}/{first.version}")


def register_tuned_model(*, run_id: str, config: Config, provider: str, model_id: str,
                         artifacts: dict[str, str], tags: dict[str, str], description: str) -> RegisteredVersion:
    client = MlflowClient()
    name = config.tune.registered_model_name
    found = existing_version(client, name, run_id)
    if found is not None:
        logger.info("run %s already registered as %s version %s", run_id, name, found.version)
        return found
    logged = finished_logged_model(client, run_id) or _log_model(config, provider, model_id, artifacts)
    try:
        client.create_registered_model(name, description=(
            "Extractive question answering: given a passage (`context`) and a `question`, returns the shortest "
            "answer span (`answer`). Each version is a model fine-tuned by finetune-mlflow; see its tags."))
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, logged.model_uri, run_id=run_id, tags=tags, description=description,
                                          model_id=logged.model_id)
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return RegisteredVersion(name, version.version, f"models:/{name}/{version.version}")


def finished_logged_model(client: MlflowClient, run_id: str) -> LoggedModel | None:
    """What an interrupted registration of this run left: a READY model is reused (it was logged in full, only
    its version is missing); a PENDING one (killed while logging) is marked FAILED, so it is not mistaken for a
    servable model."""
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'")
    ready = None
    for model in models:
        if model.name != MODEL_NAME_IN_RUN:
            continue
        if model.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            client.set_logged_model_tags(model.model_id, {"finetune.end_reason": "left PENDING by an interrupted "
                                                          "registration; a rerun logged the model again"})
            logger.warning("logged model %s of run %s was left PENDING by an interrupted registration: marked "
                           "FAILED, logging the model again", model.model_id, run_id)
        elif model.status == LoggedModelStatus.READY and ready is None:
            logger.info("reusing logged model %s of run %s (logged before the registration was interrupted)",
                        model.model_id, run_id)
            ready = model
    return ready


def _log_model(config: Config, provider: str, model_id: str, artifacts: dict[str, str]) -> ModelInfo:
    signature = infer_signature(EXAMPLE_INPUT, pd.DataFrame({"answer": ["Warsaw"]}))
    # Model.log with validate_serving_input=False: the signature and the example are saved, but MLflow does not
    # load the model and predict the example at log time (for a hosted model that would be two paid requests per
    # registration, and a registration that fails whenever the endpoint is down). `pyfunc.log_model` does not
    # pass the switch through (and pyfunc.save_model refuses it, hence _PyfuncFlavor); the evaluation has already
    # exercised the model on real questions.
    return mlflow.models.Model.log(
        artifact_path=None,
        flavor=_PyfuncFlavor,
        flavor_name="mlflow.pyfunc",
        validate_serving_input=False,
        name=MODEL_NAME_IN_RUN,
        python_model=str(PACKAGE_DIR / "serving.py"),
        model_config={"provider": provider, "model_id": model_id,
                      "provider_settings": provider_settings(config, provider)},
        artifacts=artifacts,
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=EXAMPLE_INPUT,
        # Given, not inferred: inference loads the model and predicts the input example to see what it imports.
        pip_requirements=serving_requirements(),
    )

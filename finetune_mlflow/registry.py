"""Log the tuned model as a servable pyfunc and register it, at most once per run (safe to call again)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.model_code import serving_requirements, stage_package
from finetune_mlflow.providers import get_provider
from finetune_mlflow.qa_model import WEIGHTS_ARTIFACT
from finetune_mlflow.scratch import scratch_dir

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_NAME_IN_RUN = "model"
# Where the tune run keeps a local model's weights: `tuned_model/<job_id>/weights.npz`, named like the model id.
TUNED_MODEL_DIR = "tuned_model"
# Settings that name this machine's folders: a served model gets its weights from the model itself.
MACHINE_LOCAL_SETTINGS = {"jobs_dir"}
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
    settings = {f"{provider}.{k}": v for k, v in dataclasses.asdict(getattr(config, provider)).items()
                if k not in MACHINE_LOCAL_SETTINGS}
    settings["evaluate.max_output_tokens"] = config.evaluate.max_output_tokens
    settings["evaluate.request_retries"] = config.evaluate.request_retries
    settings["evaluate.retry_backoff_seconds"] = config.evaluate.retry_backoff_seconds
    return settings


def existing_version(client: MlflowClient, name: str, run_id: str) -> RegisteredVersion | None:
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    first = min(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, first.version, f"models:/{name}/{first.version}")


def _log_local_weights(run_id: str, config: Config, model_id: str) -> str:
    """Upload the local job's weights to the run and return their `runs:/` URI, so the model's metadata names a
    run artifact rather than a file on the machine that trained it."""
    path = get_provider("local", config).weights_file(model_id)
    folder = f"{TUNED_MODEL_DIR}/{path.parent.name}"
    MlflowClient().log_artifact(run_id, str(path), folder)
    return f"runs:/{run_id}/{folder}/{path.name}"


def register_tuned_model(*, run_id: str, config: Config, provider: str, model_id: str,
                         tags: dict[str, str], description: str) -> RegisteredVersion:
    client = MlflowClient()
    name = config.tune.registered_model_name
    found = existing_version(client, name, run_id)
    if found is not None:
        logger.info("run %s already registered as %s version %s", run_id, name, found.version)
        return found
    artifacts = {WEIGHTS_ARTIFACT: _log_local_weights(run_id, config, model_id)} if provider == "local" else {}
    signature = infer_signature(EXAMPLE_INPUT, pd.DataFrame({"answer": ["Warsaw"]}))
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=str(PACKAGE_DIR / "serving.py"),
        model_config={"provider": provider, "model_id": model_id,
                      "provider_settings": provider_settings(config, provider)},
        artifacts=artifacts,
        code_paths=[str(stage_package(PACKAGE_DIR / "serving.py", scratch_dir("model-code")))],
        pip_requirements=serving_requirements(),
        signature=signature,
        input_example=EXAMPLE_INPUT,
    )
    try:
        client.create_registered_model(name, description=(
            "Extractive question answering: given a passage (`context`) and a `question`, returns the shortest "
            "answer span (`answer`). Each version is a model fine-tuned by finetune-mlflow; see its tags."))
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, description=description,
                                          model_id=info.model_id)
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return RegisteredVersion(name, version.version, f"models:/{name}/{version.version}")

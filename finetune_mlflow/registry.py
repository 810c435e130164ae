"""Log the tuned model as a servable pyfunc and register it, at most once per run (safe to call again)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.model_code import stage_package
from finetune_mlflow.scratch import scratch_dir

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_NAME_IN_RUN = "model"
SERVING_ARTIFACT = "serving"  # JSON: provider, model id and non-secret settings, read by qa_model at load time
# What every registered version needs to serve, besides the provider's own packages.
BASE_REQUIREMENTS = ("mlflow", "pandas", "pyyaml", "numpy")
# Where the tune run keeps a model it ships (local weights, a merged transformers model): `tuned_model/<...>`.
TUNED_MODEL_DIR = "tuned_model"
# Settings that name this machine's folders: a served model gets its files from the model itself.
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


def pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """Explicit, pinned pip requirements: MLflow would otherwise infer them by re-importing the model in a
    subprocess (seconds per registration) and could still miss the provider's SDK."""
    # A local build tag is not on the package index: torch 2.13.0+cpu -> torch==2.13.0.
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}"
            for name in dict.fromkeys(BASE_REQUIREMENTS + packages)]


def existing_version(client: MlflowClient, name: str, run_id: str) -> RegisteredVersion | None:
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    first = min(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, first.version, f"models:/{name}/{first.version}")


def _upload(run_id: str, artifacts: dict[str, str]) -> dict[str, str]:
    """Put the files a version ships on the run (`tuned_model/<parent>/<name>`) and name them by `runs:/` URI, so
    the model's metadata names a run artifact, never a path on the machine that trained it."""
    client, uris = MlflowClient(), {}
    for name, local in artifacts.items():
        path = Path(local)
        folder = f"{TUNED_MODEL_DIR}/{path.parent.name}"
        if path.is_dir():
            client.log_artifacts(run_id, str(path), f"{folder}/{path.name}")
        else:
            client.log_artifact(run_id, str(path), folder)
        uris[name] = f"runs:/{run_id}/{folder}/{path.name}"
    return uris


def register_tuned_model(*, run_id: str, config: Config, provider: str, model_id: str, logged_model_id: str | None,
                         artifacts: dict[str, str], packages: tuple[str, ...], tags: dict[str, str],
                         description: str) -> RegisteredVersion:
    """Log the pyfunc into the run's LoggedModel `logged_model_id` (created before evaluation, so its metrics are
    linked) and register it as a version of `tune.registered_model_name`; once per run."""
    client = MlflowClient()
    name = config.tune.registered_model_name
    found = existing_version(client, name, run_id)
    if found is not None:
        logger.info("run %s already registered as %s version %s", run_id, name, found.version)
        return found
    signature = infer_signature(EXAMPLE_INPUT, pd.DataFrame({"answer": ["Warsaw"]}))
    with tempfile.TemporaryDirectory(prefix="serving-") as folder:
        # An artifact, not `model_config`: MLflow logs a model_config as run params, one per setting.
        serving = Path(folder) / "serving.json"
        serving.write_text(json.dumps({"provider": provider, "model_id": model_id,
                                       "provider_settings": provider_settings(config, provider)}), encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PACKAGE_DIR / "serving.py"),
            artifacts={**_upload(run_id, artifacts), SERVING_ARTIFACT: str(serving)},
            # Only what serving imports, not the whole package (tests, __pycache__): fewer objects per version.
            code_paths=[str(stage_package(PACKAGE_DIR / "serving.py", scratch_dir("model-code")))],
            signature=signature,
            input_example=EXAMPLE_INPUT,
            pip_requirements=pinned_requirements(packages),
            model_id=logged_model_id,
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

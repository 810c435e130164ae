"""Log the tuned model as a servable pyfunc and register it, at most once per run (safe to call again) and once
per distinct model (its content fingerprint, `model_sha256`); a sweep child only logs it, its sweep registers the
winner."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.model_code import stage_package
from finetune_mlflow.scratch import scratch_dir
from finetune_mlflow.served import SERVING_ARTIFACT
from finetune_mlflow.run_names import SWEEP_POINT_TAG

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_NAME_IN_RUN = "model"
# What every registered version needs to serve, besides the provider's own packages.
BASE_REQUIREMENTS = ("mlflow", "pandas", "pyyaml", "numpy")
# Where the tune run keeps a model it ships (local weights, a merged transformers model): `tuned_model/<...>`.
TUNED_MODEL_DIR = "tuned_model"
# Settings that name this machine's folders: a served model gets its files from the model itself.
MACHINE_LOCAL_SETTINGS = {"jobs_dir"}
# A sweep child's run carries this tag (its grid point): it logs its model but registers no version; the sweep
# parent registers only the winner, from the tags and description the child left on its LoggedModel.
PENDING_TAGS = "finetune.version_tags"
PENDING_DESCRIPTION = "finetune.version_description"
# The content of what a version serves: the same model (same weights and serving settings, or the same hosted
# model id) is registered once, however many runs produced it.
FINGERPRINT_TAG = "model_sha256"
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


_STAGED: list[Path] = []
_STAGING = threading.Lock()


def staged_code() -> Path:
    """The package files serving needs, staged once per process (finding them parses every module with `ast`)."""
    with _STAGING:
        if not _STAGED:
            _STAGED.append(stage_package(PACKAGE_DIR / "serving.py", scratch_dir("model-code")))
        return _STAGED[0]


def warm_up(packages: tuple[str, ...]) -> None:
    """Start in the background what a process's first registration pays whatever the model (staging the serving
    code, importing mlflow.pyfunc, MLflow's map of installed distributions): `tune` calls it while the job trains,
    so its registration does not wait for them."""
    threading.Thread(target=_warm, args=(packages,), name="registration-warm-up", daemon=True).start()


def _warm(packages: tuple[str, ...]) -> None:
    try:
        staged_code()
        import mlflow.pyfunc  # noqa: F401
        from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

        # Logging a model runs this check, which first maps every installed distribution to its modules (~0.35 s
        # here, once per process, no switch to skip it); running it now fills that map. Not a documented API: an
        # upgrade that moves it only loses the head start (the error is swallowed below).
        warn_dependency_requirement_mismatches(pinned_requirements(packages))
    except Exception:  # noqa: BLE001 - a warm-up; the registration does the same work itself if this fails
        logger.debug("registration warm-up failed", exc_info=True)


class _PyfuncFlavor:
    """mlflow.pyfunc as a `Model.log` flavor: `Model.log` reads `validate_serving_input` from the keyword
    arguments it hands to the flavor's save_model, which pyfunc's refuses; dropped here."""

    @staticmethod
    def save_model(*, validate_serving_input: bool = True, **kwargs) -> None:
        mlflow.pyfunc.save_model(**kwargs)


def finished_logged_model(client: MlflowClient, run_id: str, keep: str | None) -> LoggedModel | None:
    """What an interrupted registration of this run left: a READY model is reused (it was logged in full, only
    its version is missing); a PENDING one other than `keep` (the model this run's evaluation is linked to, which
    the registration logs into) was killed while logging: it is marked FAILED, so it is not mistaken for a
    servable model."""
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'")
    ready = None
    for model in models:
        if model.name != MODEL_NAME_IN_RUN or (model.model_id == keep and model.status == LoggedModelStatus.PENDING):
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


def fingerprint(provider: str, model_id: str, artifacts: dict[str, str], settings: dict) -> str:
    """sha256 of what a version serves: the provider, its serving settings and the shipped files' contents (a
    model that ships no files is its provider's model id; a shipped model's id is a path on this machine)."""
    digest = hashlib.sha256(json.dumps({"provider": provider, "settings": settings,
                                        "model_id": "" if artifacts else model_id}, sort_keys=True,
                                       default=str).encode())
    for name in sorted(artifacts):
        root = Path(artifacts[name])
        for path in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
            digest.update(f"\0{name}/{path.relative_to(root) if path != root else ''}\0".encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _oldest_version(client: MlflowClient, name: str, clause: str) -> RegisteredVersion | None:
    versions = client.search_model_versions(f"name = '{name}' and {clause}")
    if not versions:
        return None
    first = min(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, first.version, f"models:/{name}/{first.version}")


def same_model_version(client: MlflowClient, name: str, model_sha256: str) -> RegisteredVersion | None:
    """The oldest version of `name` that serves exactly this model, if any."""
    return _oldest_version(client, name, f"tags.{FINGERPRINT_TAG} = '{model_sha256}'")


def existing_version(client: MlflowClient, name: str, run_id: str) -> RegisteredVersion | None:
    """The oldest version of `name` registered from `run_id`, if any (a rerun registers nothing twice)."""
    return _oldest_version(client, name, f"run_id = '{run_id}'")


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


def _log_model(run_id: str, config: Config, provider: str, model_id: str, logged_model_id: str | None,
               artifacts: dict[str, str], packages: tuple[str, ...], lifecycle: dict[str, str]) -> ModelInfo:
    """Log the pyfunc into `logged_model_id` (or a new LoggedModel). Model.log with validate_serving_input=False:
    the signature and the example are saved, but MLflow does not load the model and predict the example at log
    time (for a hosted model two paid requests per registration, and a registration that fails whenever the
    endpoint is down); `pyfunc.log_model` does not pass the switch through, hence _PyfuncFlavor. Requirements are
    given, not inferred: inference too loads the model and predicts."""
    signature = infer_signature(EXAMPLE_INPUT, pd.DataFrame({"answer": ["Warsaw"]}))
    with tempfile.TemporaryDirectory(prefix="serving-") as folder:
        # An artifact, not `model_config`: MLflow logs a model_config as run params, one per setting.
        serving = Path(folder) / "serving.json"
        serving.write_text(json.dumps({"provider": provider, "model_id": model_id,
                                       "provider_settings": provider_settings(config, provider),
                                       # The recorded shutdown date and the warning threshold: loading and
                                       # serving warn without a network call.
                                       "lifecycle": {**lifecycle, "warn_days": config.lifecycle.warn_days}}),
                           encoding="utf-8")
        return mlflow.models.Model.log(
            artifact_path=None, flavor=_PyfuncFlavor, flavor_name="mlflow.pyfunc", validate_serving_input=False,
            name=MODEL_NAME_IN_RUN, model_id=logged_model_id, python_model=str(PACKAGE_DIR / "serving.py"),
            artifacts={**_upload(run_id, artifacts), SERVING_ARTIFACT: str(serving)},
            # Only what serving imports, not the whole package (tests, __pycache__): fewer objects per version.
            code_paths=[str(staged_code())],
            signature=signature, input_example=EXAMPLE_INPUT, pip_requirements=pinned_requirements(packages),
        )


def register_tuned_model(*, run_id: str, config: Config, provider: str, model_id: str, logged_model_id: str | None,
                         artifacts: dict[str, str], packages: tuple[str, ...], tags: dict[str, str],
                         description: str) -> RegisteredVersion:
    """Log the pyfunc into the run's LoggedModel `logged_model_id` (created before evaluation, so its metrics are
    linked) and register it as a version of `tune.registered_model_name`: once per run, and once per model (a run
    that produced a model some version already serves points at that version). A sweep child's run only logs
    it (the version number is then empty and the URI is the LoggedModel's)."""
    client = MlflowClient()
    name = config.tune.registered_model_name
    found = existing_version(client, name, run_id)
    if found is not None:
        logger.info("run %s already registered as %s version %s", run_id, name, found.version)
        return found
    tags = {**tags, FINGERPRINT_TAG: fingerprint(provider, model_id, artifacts, provider_settings(config, provider))}
    logged = finished_logged_model(client, run_id, keep=logged_model_id) or _log_model(
        run_id, config, provider, model_id, logged_model_id, artifacts, packages,
        {k: v for k, v in tags.items() if k.startswith("finetune.")})
    if SWEEP_POINT_TAG in client.get_run(run_id).data.tags:
        client.set_logged_model_tags(logged.model_id, {PENDING_TAGS: json.dumps(tags),
                                                       PENDING_DESCRIPTION: description})
        logger.info("sweep child %s: model logged as %s, not registered (the sweep registers its winner)", run_id,
                    logged.model_uri)
        return RegisteredVersion(name, "", logged.model_uri)
    return _create_version(client, name, logged.model_uri, logged.model_id, run_id, tags, description)


def register_logged(run_id: str, name: str) -> RegisteredVersion:
    """Register the model a sweep child logged (the sweep's winner) with the tags and description it left."""
    client = MlflowClient()
    found = existing_version(client, name, run_id)
    if found is not None:
        return found
    experiment_id = client.get_run(run_id).info.experiment_id
    models = [m for m in client.search_logged_models(experiment_ids=[experiment_id],
                                                     filter_string=f"source_run_id = '{run_id}'")
              if m.status == LoggedModelStatus.READY and PENDING_TAGS in m.tags]
    if not models:
        raise ValueError(f"run {run_id} logged no finished model to register")
    model = models[0]
    return _create_version(client, name, model.model_uri, model.model_id, run_id,
                           json.loads(model.tags[PENDING_TAGS]), model.tags.get(PENDING_DESCRIPTION, ""))


def _create_version(client: MlflowClient, name: str, model_uri: str, model_id: str, run_id: str,
                    tags: dict[str, str], description: str) -> RegisteredVersion:
    same = same_model_version(client, name, tags[FINGERPRINT_TAG])
    if same is not None:
        logger.info("run %s produced the model %s version %s already serves: not registered again", run_id, name,
                    same.version)
        return same
    try:
        client.create_registered_model(name, description=(
            "Extractive question answering: given a passage (`context`) and a `question`, returns the shortest "
            "answer span (`answer`). Each version is a model fine-tuned by finetune-mlflow; see its tags."))
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, description=description,
                                          model_id=model_id)
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return RegisteredVersion(name, version.version, f"models:/{name}/{version.version}")

"""Vertex AI provider: Gemini supervised tuning through google-genai, data staged in Cloud Storage, curves read
from the tuning job's Vertex AI TensorBoard.

Resolution (config first, then environment):

- project: `vertex.project`, else `GOOGLE_CLOUD_PROJECT`, else the Application Default Credentials project.
- location: `vertex.location`, else `GOOGLE_CLOUD_LOCATION`, else `us-central1`.
- staging bucket: `vertex.staging_bucket`, else `FINETUNE_VERTEX_STAGING_BUCKET` (needed only to start a job).
- credentials: `FINETUNE_VERTEX_ACCESS_TOKEN`, when set, is used as a static OAuth bearer token (no refresh: for tests,
  CI with a short-lived `gcloud auth print-access-token`, or a token broker); otherwise Application Default
  Credentials (`google.auth.default()`, e.g. `gcloud auth application-default login` or a service account).
  The token is never logged nor put into an exception message.
- endpoints: `vertex.api_endpoint` (default `https://{location}-aiplatform.googleapis.com`, or
  `https://aiplatform.{us|eu}.rep.googleapis.com` for the `us`/`eu` multi-region locations, as google-genai builds them)
  serves tuning jobs, prediction and the Experiment/TensorBoard reads; `vertex.storage_endpoint` redirects Cloud Storage.
- base models: only those Vertex documents as tunable (`TUNABLE_MODELS`); another is refused before anything is
  uploaded. A model whose tuned endpoints are served only from a multi-region needs `vertex.location: us` or `eu`.
- thinking: predictions ask a 2.5 model for its lowest thinking budget (`vertex.thinking_budget`, 0 = off, which
  Vertex recommends for tuned models; 2.5 Pro cannot turn thinking off and gets its minimum); thinking tokens count as
  output tokens (they bill as output), and an empty answer cut by MAX_TOKENS is an error, not a wrong answer.
- quota errors: Vertex answers 429 RESOURCE_EXHAUSTED without Retry-After and mostly without RetryInfo; we wait the
  RetryInfo delay when present, else back off from `vertex.quota_backoff_seconds`, doubling, jittered, capped.

Training curves. A Gemini tuning job reports an `experiment`: the resource name of a Vertex AI Experiment, i.e. a
Vertex ML Metadata context `projects/P/locations/L/metadataStores/default/contexts/EXPERIMENT`. What we rely on,
all of it documented REST:

1. the Experiment context's `metadata.backing_tensorboard_resource` names its TensorBoard
   (`projects/P/locations/L/tensorboards/T`) -- overridable with `vertex.tensorboard`;
2. Vertex AI Experiments back an experiment with the TensorBoard experiment of the same id (the aiplatform SDK
   creates `tensorboards/T/experiments/EXPERIMENT`), whose runs are listed with `.../experiments/EXPERIMENT/runs`;
3. each run's time series are listed with `.../runs/R/timeSeries`; we match them by `displayName`
   (`/train_total_loss`, ...) and read every point with `POST {timeSeries}:exportTensorboardTimeSeries`, page by
   page (`GET {timeSeries}:read` randomly samples any series longer than its maxDataPoints, at most 10,000).

Until the job has an experiment, or while any of those resources is missing (404), `read_metrics` returns no points.
The cursor is JSON `{metric key: last step returned}`; only later steps are returned, so nothing is read twice.
"""

from __future__ import annotations

import json
import re
import os
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from finetune_mlflow import costing
from finetune_mlflow.providers.vertex import data as vertex_data
from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError, DataError, ProviderError
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, clean_completion, user_prompt
from finetune_mlflow.providers.base import (
    Checkpoint,
    ProviderBase,
    shared_hyperparameters,
    JobState,
    MetricPoint,
    MetricsPage,
    Prediction,
    PreflightReport,
    TuningJob,
    TuningRequest,
)
from finetune_mlflow.providers.retry import (
    RetryPolicy,
    call_with_retries,
    error_headers,
    retry_after_seconds,
    retry_info_seconds,
)

T = TypeVar("T")

TOKEN_ENV = "FINETUNE_VERTEX_ACCESS_TOKEN"
BUCKET_ENV = "FINETUNE_VERTEX_STAGING_BUCKET"
DEFAULT_LOCATION = "us-central1"
_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

# TensorBoard time-series display name -> the shared metric key the steps log.
SERIES_KEYS: dict[str, str] = {
    "/train_total_loss": "train_loss",
    "/eval_total_loss": "val_loss",
    "/train_fraction_of_correct_next_step_preds": "train_token_accuracy",
    "/eval_fraction_of_correct_next_step_preds": "val_token_accuracy",
}

_ADAPTER_SIZES = {1: "ONE", 2: "TWO", 4: "FOUR", 8: "EIGHT", 16: "SIXTEEN", 32: "THIRTY_TWO"}
# google-genai's AdapterSize enum value -> the adapter size as the tune step logs it (`ADAPTER_SIZE_FOUR` -> 4).
_ADAPTER_SIZE_NUMBERS = {f"ADAPTER_SIZE_{word}": size for size, word in _ADAPTER_SIZES.items()}
# Base models Vertex documents for supervised tuning ("About supervised fine-tuning for Gemini models",
# cloud.google.com/vertex-ai/generative-ai/docs/models/gemini-supervised-tuning, page updated 2026-09-25, consulted
# 2026-12-03; 2.0 Flash and Flash-Lite are no longer listed), with where their tuned models are served: "regional"
# (any tuning region) or "multi-region" (only from the `us`/`eu` multi-region endpoints, as the page says of the 3.x
# Flash / Flash-Lite models; their exact ids were not confirmed, so they are not listed yet: add them here, with
# "multi-region" and the page date).
TUNABLE_MODELS: dict[str, str] = {
    "gemini-2.5-flash": "regional",
    "gemini-2.5-flash-lite": "regional",
    "gemini-2.5-pro": "regional",
}
MULTI_REGIONS = ("us", "eu")  # google-genai's _MULTI_REGIONAL_LOCATIONS
# The lowest thinking budget each model accepts (Gemini "Thinking" docs: 2.5 Flash and Flash-Lite turn thinking off
# with 0; 2.5 Pro cannot, its range starts at 128). A model not listed gets no thinking config (its own default).
LOWEST_THINKING_BUDGET: dict[str, int] = {"gemini-2.5-flash": 0, "gemini-2.5-flash-lite": 0, "gemini-2.5-pro": 128}
# Google's documented retry strategy for its APIs is truncated exponential backoff with random jitter; the cap.
QUOTA_MAX_BACKOFF_S = 32.0
QUOTA_JITTER = 0.5
# Adapter sizes Vertex documents per base model ("About supervised fine-tuning for Gemini models", Limitations);
# the API enum accepts more, and a job with an undocumented size fails after it is created (and billed).
DOCUMENTED_ADAPTER_SIZES = {"gemini-2.5-flash": (1, 2, 4, 8, 16), "gemini-2.5-pro": (1, 2, 4, 8)}


def _note(tried: list[str], resource: str) -> None:
    if resource not in tried:
        tried.append(resource)


def check_adapter_size(base_model: str, adapter_size: int) -> None:
    """Refuse an adapter size the base model's documentation does not list, before any upload or job."""
    documented = DOCUMENTED_ADAPTER_SIZES.get(base_model.rsplit("/", 1)[-1])
    if adapter_size and documented and adapter_size not in documented:
        raise ConfigError(f"vertex.adapter_size is {adapter_size}, but {base_model} supports adapter sizes "
                          f"{', '.join(map(str, documented))} (or 0 for Vertex's default)")


def check_tunable(base_model: str, location: str, models: dict[str, str] = TUNABLE_MODELS) -> None:
    """Refuse a base model Vertex does not tune, or one whose tuned model a regional location cannot serve, naming
    the supported models, before any upload or job."""
    model = base_model.rsplit("/", 1)[-1]
    serving = models.get(model)
    if serving is None:
        raise ConfigError(f"tune.base_model is {base_model!r}, which Vertex AI does not tune; supervised tuning "
                          f"supports {', '.join(sorted(models))}")
    if serving == "multi-region" and location not in MULTI_REGIONS:
        raise ConfigError(f"tuned {model} models are served only from the {' / '.join(MULTI_REGIONS)} multi-region "
                          f"endpoints, but vertex.location is {location!r}; set vertex.location: us (or eu) and "
                          "leave vertex.api_endpoint empty")


def default_api_endpoint(location: str) -> str:
    """Where google-genai itself sends a location's calls: `us`/`eu` are multi-region endpoints, not regions."""
    if location in MULTI_REGIONS:
        return f"https://aiplatform.{location}.rep.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def thinking_budget(base_model: str, wanted: int) -> int | None:
    """The budget to ask `base_model` for: `wanted` raised to the model's lowest (-1: the model decides); None for a
    model without a known budget range (it keeps its default)."""
    lowest = LOWEST_THINKING_BUDGET.get(base_model.rsplit("/", 1)[-1])
    if lowest is None:
        return None
    return wanted if wanted < 0 else max(wanted, lowest)


def _check_tuning_settings(config: Config) -> None:
    """Refuse tune/vertex settings Vertex cannot honour before credentials are even looked up."""
    adapter_size = config.vertex.adapter_size
    if config.tune.batch_size != 0:
        raise ConfigError(
            f"tune.batch_size is {config.tune.batch_size}, but Vertex AI Gemini tuning has no batch size "
            "setting (Vertex picks it); set tune.batch_size: 0 in the experiment or pass -P batch_size=0"
        )
    if adapter_size != 0 and adapter_size not in _ADAPTER_SIZES:
        raise ConfigError(
            f"vertex.adapter_size is {adapter_size}; expected 0 (Vertex default) or one of "
            f"{', '.join(map(str, _ADAPTER_SIZES))}"
        )
    check_adapter_size(config.tune.base_model, adapter_size)


def _resolve_project(configured: str, adc_project: str | None) -> str:
    """Config first, then GOOGLE_CLOUD_PROJECT, then the credentials' own project; none at all is a config error."""
    project = configured or os.environ.get("GOOGLE_CLOUD_PROJECT", "") or (adc_project or "")
    if not project:
        raise ConfigError(
            "no Google Cloud project: set vertex.project in the experiment or GOOGLE_CLOUD_PROJECT"
        )
    return project


_STATES = {
    "JOB_STATE_QUEUED": JobState.PENDING,
    "JOB_STATE_PENDING": JobState.PENDING,
    "JOB_STATE_UNSPECIFIED": JobState.PENDING,
    "JOB_STATE_RUNNING": JobState.RUNNING,
    "JOB_STATE_UPDATING": JobState.RUNNING,
    "JOB_STATE_PAUSED": JobState.RUNNING,
    "JOB_STATE_CANCELLING": JobState.RUNNING,
    "JOB_STATE_SUCCEEDED": JobState.SUCCEEDED,
    "JOB_STATE_PARTIALLY_SUCCEEDED": JobState.FAILED,
    "JOB_STATE_FAILED": JobState.FAILED,
    "JOB_STATE_EXPIRED": JobState.FAILED,
    "JOB_STATE_CANCELLED": JobState.CANCELLED,
}

# Vertex hyperparameter (JSON spelling) -> the shared knob name.
HYPERPARAMETER_NAMES = {"epoch_count": "epochs", "learning_rate_multiplier": "learning_rate",
                        "adapter_size": "adapter_size"}
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_DATA_POINTS = 10000


class _HttpStatus(Exception):
    """A non-2xx answer from one of our own REST reads (Experiment/TensorBoard)."""

    def __init__(self, status: int, message: str, headers: Any, body: Any = None):
        self.status = status
        self.headers = headers
        self.details = body
        super().__init__(message)


def sanitize_label(value: str) -> str:
    """A GCP label value: lowercase letters, digits, `_` and `-`, at most 63 characters."""
    cleaned = "".join(c if c.isalnum() or c in "_-" else "-" for c in value.lower())
    return cleaned[:63]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _billed_training_tokens(metrics: dict[str, float], hyperparameters: dict[str, Any]) -> dict[str, float]:
    """What a run prices into cost_train_usd: Vertex documents `totalBillableTokenCount` as the billable tokens
    "in the tuning dataset", and bills training per dataset token per epoch."""
    epochs = _int(hyperparameters.get("epoch_count"))
    if "total_billable_token_count" not in metrics or not epochs:
        return {}
    return {"billed_training_tokens": metrics["total_billable_token_count"] * epochs}


def _wall_time_ms(value: Any) -> int:
    if not value:
        return 0
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # RFC 3339 may carry nanoseconds; datetime takes at most microseconds.
    if "." in text:
        head, _, tail = text.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        zone = tail[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        return 0


def _tuning_job_config(types: Any, request: TuningRequest, adapter: int, label: str,
                       validation_uri: str | None) -> Any:
    """The job's settings; the run label is what lets a retried create find the job it already made."""
    return types.CreateTuningJobConfig(
        epoch_count=request.epochs,
        learning_rate_multiplier=request.learning_rate,
        adapter_size=types.AdapterSize(f"ADAPTER_SIZE_{_ADAPTER_SIZES[adapter]}") if adapter else None,
        tuned_model_display_name=f"{request.suffix}-{request.run_id}"[:128],
        validation_dataset=types.TuningValidationDataset(gcs_uri=validation_uri) if validation_uri else None,
        labels={"mlflow_run_id": label},
    )


def _model_tags(job: Any) -> dict[str, str]:
    """Where the tuned model, its experiment and its base model live."""
    tags: dict[str, str] = {}
    if job.tuned_model is not None:
        if job.tuned_model.model:
            tags["vertex.model"] = job.tuned_model.model
        if job.tuned_model.endpoint:
            tags["vertex.endpoint"] = job.tuned_model.endpoint
    if job.experiment:
        tags["vertex.experiment"] = job.experiment
    if job.base_model:
        tags["vertex.base_model"] = job.base_model
    if getattr(job, "gcs_metrics_uri", None):
        tags["vertex.gcs_metrics_uri"] = job.gcs_metrics_uri
    return tags


def _spec_tags_and_hyperparameters(spec: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """What the job was trained with (sync logs these as params) and on which staged files."""
    tags: dict[str, str] = {}
    if spec is None:
        return tags, {}
    hp = spec.hyper_parameters.model_dump(exclude_none=True, mode="json") if spec.hyper_parameters else {}
    if hp:
        tags["vertex.hyperparameters"] = json.dumps(hp, sort_keys=True)
    if spec.training_dataset_uri:
        tags["vertex.training_dataset"] = spec.training_dataset_uri
    if spec.validation_dataset_uri:
        tags["vertex.validation_dataset"] = spec.validation_dataset_uri
    return tags, hp


def _data_stats_metrics(tuning_data_stats: Any) -> dict[str, float]:
    """The dataset counts Vertex reports once it has read the staged files."""
    stats = tuning_data_stats.supervised_tuning_data_stats if tuning_data_stats else None
    if stats is None:
        return {}
    metrics: dict[str, float] = {}
    for key, value in (
        ("tuning_dataset_example_count", stats.tuning_dataset_example_count),
        ("total_billable_token_count", stats.total_billable_token_count),
        ("total_tuning_character_count", stats.total_tuning_character_count),
        ("tuning_step_count", stats.tuning_step_count),
        ("total_truncated_example_count", stats.total_truncated_example_count),
    ):
        if value is not None:
            metrics[key] = float(value)
    if stats.dropped_example_reasons:
        metrics["dropped_example_count"] = float(len(stats.dropped_example_reasons))
    return metrics


def _progress_metrics(meta: Any) -> dict[str, float]:
    """Epochs done, when reported. `completedStepCount` is documented for multi-step RL only: a supervised job's
    steps come from its TensorBoard curves, and its total from `tuningDataStats` (see `_total_steps`)."""
    if meta is not None and meta.completed_epoch_count is not None:
        return {"completed_epoch_count": float(meta.completed_epoch_count)}
    return {}


def _total_steps(metrics: dict[str, float]) -> int | None:
    """The steps a supervised job will take: `supervisedTuningDataStats.tuningStepCount`, once Vertex has read the data."""
    steps = metrics.get("tuning_step_count")
    return int(steps) if steps else None


def _hyperparameters(hp: dict[str, Any]) -> dict[str, Any]:
    """The job's hyperparameters with the adapter size as a number, as tune logs it (`ADAPTER_SIZE_FOUR` -> 4)."""
    size = hp.get("adapter_size")
    return {**hp, "adapter_size": _ADAPTER_SIZE_NUMBERS.get(str(size), size)} if size is not None else hp


def _job_error(error: Any) -> tuple[str | None, str | None]:
    """A failed job's (code, message), both None while it has none."""
    if error is None:
        return None, None
    code = getattr(error, "code", None)
    return (str(code) if code is not None else None), getattr(error, "message", None)


class VertexProvider(ProviderBase):
    serving_packages = ("google-genai", "google-auth")
    # Vertex's documented quota on concurrent tuning jobs guarantees one; a project granted more (Quotas page in the
    # console) runs more with the sweep's `max_parallel_jobs`.
    max_parallel_jobs = 1
    """Gemini supervised tuning on Vertex AI (see the module docstring for configuration and assumptions)."""

    name = "vertex"
    JOB_ID_PATTERN = re.compile(r"projects/[A-Za-z0-9_.:-]+/locations/[a-z0-9-]+/tuningJobs/\d+|\d+")
    JOB_ID_EXAMPLE = "projects/P/locations/L/tuningJobs/N or the number N"

    def check_job_id(self, job_id: str) -> str:
        """A bare job number means this project and location's job of that number."""
        job_id = super().check_job_id(job_id)
        return job_id if "/" in job_id else f"projects/{self.project}/locations/{self.location}/tuningJobs/{job_id}"

    def __init__(
        self,
        config: Config,
        *,
        sleep: Callable[[float], None] = time.sleep,
        retry_policy: RetryPolicy | None = None,
    ):
        self.config = config
        vertex = config.vertex
        _check_tuning_settings(config)
        self.max_concurrency = config.evaluate.max_concurrency
        self._sleep = sleep
        self._policy = retry_policy or RetryPolicy(max_attempts=max(1, config.evaluate.request_retries + 1),
                                                   initial_backoff_s=config.evaluate.retry_backoff_seconds,
                                                   quota_backoff_s=vertex.quota_backoff_seconds,
                                                   max_backoff_s=QUOTA_MAX_BACKOFF_S, jitter=QUOTA_JITTER)
        self._timeout_s = vertex.request_timeout_seconds

        self.credentials, adc_project = self._credentials()
        self.project = _resolve_project(vertex.project, adc_project)
        self.location = vertex.location or os.environ.get("GOOGLE_CLOUD_LOCATION", "") or DEFAULT_LOCATION
        bucket = vertex.staging_bucket or os.environ.get(BUCKET_ENV, "")
        self.bucket = bucket.removeprefix("gs://").strip("/")
        self.api_endpoint = (vertex.api_endpoint or default_api_endpoint(self.location)).rstrip("/")
        self._types, self.client = self._genai_client()
        self._storage_client: Any = None
        self._session: Any = None
        # job name -> (tensorboard experiment resource, {display name: time series resource}) once found.
        self._series: dict[str, tuple[str, dict[str, str]]] = {}
        # job name -> the Experiment and TensorBoard resources looked up for its curves (said when none is found).
        self._tried: dict[str, list[str]] = {}
        self._experiments: dict[str, str] = {}
        self._gcs_metrics: dict[str, str] = {}

    def _genai_client(self) -> tuple[Any, Any]:
        """The google-genai types module and a client that makes one attempt per call: retries are ours."""
        from google import genai
        from google.genai import types

        client = genai.Client(
            vertexai=True,
            project=self.project,
            location=self.location,
            credentials=self.credentials,
            http_options=types.HttpOptions(
                base_url=self.api_endpoint + "/",
                timeout=int(self._timeout_s * 1000),
                # One attempt per call: our call_with_retries owns retries, so waits stay out of latency.
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )
        return types, client

    # ------------------------------------------------------------------ plumbing
    def _credentials(self) -> tuple[Any, str | None]:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if token:
            from google.oauth2.credentials import Credentials

            return Credentials(token=token), None
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, project = google.auth.default(scopes=list(_SCOPES))
        except DefaultCredentialsError:
            raise ConfigError(
                "no Google Cloud credentials: run `gcloud auth application-default login`, set "
                f"GOOGLE_APPLICATION_CREDENTIALS to a service account key, or set {TOKEN_ENV} to an access token"
            ) from None
        return credentials, project

    def _storage(self) -> Any:
        if self._storage_client is None:
            from google.cloud import storage

            options = {"api_endpoint": self.config.vertex.storage_endpoint} if self.config.vertex.storage_endpoint else None
            self._storage_client = storage.Client(
                project=self.project, credentials=self.credentials, client_options=options
            )
        return self._storage_client

    def _authorized_session(self) -> Any:
        if self._session is None:
            from google.auth.transport.requests import AuthorizedSession

            self._session = AuthorizedSession(self.credentials)
        return self._session

    def _classify(self, error: BaseException) -> ProviderError | None:
        from google.api_core import exceptions as core_exceptions
        from google.auth import exceptions as auth_exceptions
        from google.genai import errors as genai_errors

        status: int | None = None
        message: str
        retryable: bool
        if isinstance(error, genai_errors.APIError):
            status = error.code
            message = error.message or error.status or type(error).__name__
            retryable = status in _RETRYABLE_STATUS
        elif isinstance(error, _HttpStatus):
            status = error.status
            message = str(error)
            retryable = status in _RETRYABLE_STATUS
        elif isinstance(error, core_exceptions.GoogleAPICallError):
            status = error.code
            message = error.message
            retryable = status in _RETRYABLE_STATUS
        elif isinstance(error, auth_exceptions.GoogleAuthError):
            # Never echo the error text: a refresh error can quote the credentials' request.
            return ProviderError(
                self.name,
                f"Google Cloud authentication failed ({type(error).__name__}); refresh the credentials "
                f"(gcloud auth application-default login, or a new {TOKEN_ENV})",
            )
        else:
            import httpx
            import requests

            if isinstance(error, (httpx.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError)):
                return ProviderError(self.name, f"network error: {type(error).__name__}: {error}", retryable=True)
            return None
        return ProviderError(self.name, message, status=status, retryable=retryable)

    @staticmethod
    def _retry_after(error: BaseException) -> float | None:
        """A Retry-After header if any (Vertex sends none), else the body's google.rpc.RetryInfo delay."""
        hinted = retry_after_seconds(error_headers(error))
        return hinted if hinted is not None else retry_info_seconds(getattr(error, "details", None))

    def _call(self, call: Callable[[], T], what: str) -> Any:
        return call_with_retries(
            call,
            classify=self._classify,
            what=what,
            policy=self._policy,
            retry_after=self._retry_after,
            sleep=self._sleep,
        )

    def _rest_get(self, resource: str, params: dict[str, Any] | None = None, *,
                  body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """GET `{api_endpoint}/v1/{resource}` (POST with a JSON `body` when given) with retries; None on 404."""
        url = f"{self.api_endpoint}/v1/{resource}"

        def call() -> dict[str, Any] | None:
            session = self._authorized_session()
            response = (session.post(url, json=body, timeout=self._timeout_s) if body is not None
                        else session.get(url, params=params or None, timeout=self._timeout_s))
            if response.status_code == 404:
                return None
            if response.status_code >= 400:
                try:
                    error_body = response.json()
                    detail = error_body.get("error", {}).get("message", "")
                except (ValueError, AttributeError):
                    error_body, detail = None, ""
                raise _HttpStatus(response.status_code, f"{'POST' if body is not None else 'GET'} {resource}: "
                                  f"{detail or response.reason}", response.headers, error_body)
            return response.json()

        return self._call(call, f"reading {resource}").value

    def _rest_list(self, resource: str, field: str) -> list[dict[str, Any]] | None:
        """Every item of a paginated list; None when the parent does not exist (404)."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            page = self._rest_get(resource, {"pageToken": token} if token else None)
            if page is None:
                return None
            items.extend(page.get(field, []))
            token = page.get("nextPageToken")
            if not token:
                return items

    # ------------------------------------------------------------------ data
    def _data_paths(self, request: TuningRequest) -> tuple[Path, Path]:
        base = Path(request.prepared_dir) / "vertex"
        return base / "train.jsonl", base / "validation.jsonl"

    def preflight(self, request: TuningRequest) -> PreflightReport:
        vertex = self.config.vertex
        check_tunable(request.base_model, self.location)
        train_path, validation_path = self._data_paths(request)
        train = vertex_data.read_dataset(train_path, max_example_tokens=vertex.max_example_tokens)
        warnings: list[str] = []
        n_validation = 0
        if validation_path.exists():
            validation = vertex_data.read_dataset(validation_path, max_example_tokens=vertex.max_example_tokens)
            vertex_data.check_validation_size(validation, vertex.max_validation_examples)
            n_validation = validation.n_examples
        else:
            warnings.append(f"{validation_path} does not exist; the job will run without validation (no val_loss)")
        billed = costing.billed_tokens(train.total_tokens, request.epochs)
        cost = costing.estimate_cost_usd(
            billed, vertex_data.price_per_million(request.base_model, vertex.training_price_per_million_tokens))
        if cost is None:
            warnings.append(
                f"no price for {request.base_model} under vertex.training_price_per_million_tokens (exact names "
                "only): no cost estimate, and a max_cost_usd guard refuses the job"
            )
        return PreflightReport(
            n_train=train.n_examples,
            n_validation=n_validation,
            estimated_train_tokens=train.total_tokens,
            estimated_billed_tokens=billed,
            estimated_cost_usd=cost,
            warnings=warnings,
        )

    # ------------------------------------------------------------------ jobs
    def _find_job_for_run(self, label: str) -> Any:
        """A job already created for this run (labelled mlflow_run_id), so a retried create never makes two."""
        config = self._types.ListTuningJobsConfig(filter=f'labels.mlflow_run_id="{label}"')
        pager = self._call(lambda: self.client.tunings.list(config=config), "listing tuning jobs").value
        for job in pager:
            if (job.labels or {}).get("mlflow_run_id") == label:
                return job
        return None

    def _check_can_start(self, request: TuningRequest) -> None:
        check_tunable(request.base_model, self.location)
        if request.batch_size != 0:
            raise ConfigError("Vertex AI Gemini tuning has no batch size setting; set tune.batch_size: 0")
        if not self.bucket:
            raise ConfigError(
                f"no staging bucket for the tuning data: set vertex.staging_bucket or {BUCKET_ENV} to a Cloud Storage "
                f"bucket in {self.location} the Vertex AI service agent can read"
            )

    def _stage_data(self, request: TuningRequest, train_path: Path, validation_path: Path) -> dict[str, str]:
        """Upload the prepared files under this run's prefix: file name -> gs:// URI (no validation file, no entry)."""
        prefix = "/".join(p for p in (self.config.vertex.staging_prefix.strip("/"), request.run_id) if p)
        uris = {}
        for path in (train_path, validation_path):
            if not path.exists():
                if path == train_path:
                    raise DataError(str(path), None, "file does not exist; run the prepare step first")
                continue
            object_name = f"{prefix}/{path.name}"
            blob = self._storage().bucket(self.bucket).blob(object_name)
            self._call(
                lambda blob=blob, path=path: blob.upload_from_filename(
                    str(path), content_type="application/jsonl", retry=None, timeout=self._timeout_s
                ),
                f"uploading {path.name} to gs://{self.bucket}/{object_name}",
            )
            uris[path.name] = f"gs://{self.bucket}/{object_name}"
        return uris

    def _create_once(self, label: str, base_model: str, training: Any, job_config: Any) -> Any:
        """Create the tuning job with retries, never twice: a retry first looks for the job by its run label."""
        created: list[Any] = []

        def create() -> Any:
            # After a failed attempt the job may exist anyway (the error was on the way back): look before retrying.
            if created:
                found = self._find_job_for_run(label)
                if found is not None:
                    return found
            created.append(True)
            with warnings.catch_warnings():
                # google-genai flags tuning as "experimental" on every call; that is not news to our users.
                warnings.filterwarnings("ignore", message=".*tuning implementation is experimental.*")
                return self.client.tunings.tune(base_model=base_model, training_dataset=training, config=job_config)

        return self._call(create, f"creating a tuning job for {base_model}").value

    def start_job(self, request: TuningRequest) -> TuningJob:
        self._check_can_start(request)
        label = sanitize_label(request.run_id)
        existing = self._find_job_for_run(label)
        if existing is not None:
            return self._normalize(existing)
        train_path, validation_path = self._data_paths(request)
        uris = self._stage_data(request, train_path, validation_path)
        job_config = _tuning_job_config(self._types, request, self.config.vertex.adapter_size, label,
                                        uris.get(validation_path.name))
        training = self._types.TuningDataset(gcs_uri=uris[train_path.name])
        return self._normalize(self._create_once(label, request.base_model, training, job_config))

    def _normalize(self, job: Any) -> TuningJob:
        state_word = getattr(job.state, "value", job.state) or "JOB_STATE_UNSPECIFIED"
        tags = _model_tags(job)
        if job.experiment:
            self._experiments[job.name] = job.experiment
        if tags.get("vertex.gcs_metrics_uri"):
            self._gcs_metrics[job.name] = tags["vertex.gcs_metrics_uri"]
        spec_tags, hp = _spec_tags_and_hyperparameters(getattr(job, "supervised_tuning_spec", None))
        tags.update(spec_tags)
        metrics = _data_stats_metrics(job.tuning_data_stats)
        metrics.update(_billed_training_tokens(metrics, hp))
        metrics.update(_progress_metrics(getattr(job, "tuning_job_metadata", None)))
        hp = _hyperparameters(hp)
        error_code, error_message = _job_error(job.error)
        return TuningJob(
            job_id=job.name,
            state=_STATES.get(str(state_word), JobState.PENDING),
            provider_status=str(state_word),
            tuned_model=job.tuned_model.endpoint if job.tuned_model is not None else None,
            error_code=error_code,
            error_message=error_message,
            tags=tags,
            metrics=metrics,
            base_model=job.base_model.rsplit("/", 1)[-1] if job.base_model else None,
            hyperparameters=shared_hyperparameters(hp, HYPERPARAMETER_NAMES),
            total_steps=_total_steps(metrics),
        )

    def get_job(self, job_id: str) -> TuningJob:
        job = self._call(lambda: self.client.tunings.get(name=job_id), f"reading tuning job {job_id}").value
        return self._normalize(job)

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """`tunedModel.checkpoints[]` (Gemini jobs export one per epoch by default, each deployed to its own
        endpoint; the tuned model's endpoint serves the default one), oldest step first; none while unfinished or
        with `export_last_checkpoint_only` beyond the final one."""
        job = self._call(lambda: self.client.tunings.get(name=job_id), f"reading tuning job {job_id}").value
        found = (job.tuned_model.checkpoints or []) if job.tuned_model is not None else []
        return sorted((Checkpoint(checkpoint_id=str(c.checkpoint_id), model=c.endpoint, step=int(c.step or 0),
                                  epoch=int(c.epoch) if c.epoch is not None else None)
                       for c in found if c.endpoint), key=lambda c: c.step)

    def cancel_job(self, job_id: str) -> TuningJob:
        """`POST .../tuningJobs/N:cancel`; the job goes CANCELLING, then CANCELLED (returned as it is now)."""
        self._call(lambda: self.client.tunings.cancel(name=job_id), f"cancelling tuning job {job_id}")
        return self.get_job(job_id)

    def list_jobs(self) -> Iterator[str]:
        pager = self._call(lambda: self.client.tunings.list(), "listing tuning jobs").value
        for job in pager:
            if job.name:
                yield job.name

    # ------------------------------------------------------------------ metrics
    def _find_series(self, job_id: str) -> tuple[str, dict[str, str]] | None:
        cached = self._series.get(job_id)
        if cached is not None and len(cached[1]) == len(SERIES_KEYS):
            return cached
        experiment = self._experiments.get(job_id)
        if experiment is None:
            experiment = self._normalize(
                self._call(lambda: self.client.tunings.get(name=job_id), f"reading tuning job {job_id}").value
            ).tags.get("vertex.experiment")
        tried = self._tried.setdefault(job_id, [])
        if not experiment:
            _note(tried, f"{job_id} (no experiment on the job)")
            return None  # the job has not created its experiment yet
        _note(tried, experiment)
        experiment_id = experiment.rsplit("/", 1)[-1]
        if cached is not None:
            tb_experiment = cached[0]
        else:
            tensorboard = self.config.vertex.tensorboard
            if not tensorboard:
                context = self._rest_get(experiment)
                if context is None:
                    return None
                tensorboard = (context.get("metadata") or {}).get("backing_tensorboard_resource") or ""
                if not tensorboard:
                    return None  # no TensorBoard yet (or none: set vertex.tensorboard)
            tb_experiment = f"{tensorboard.strip('/')}/experiments/{experiment_id}"
        _note(tried, f"{tb_experiment}/runs")
        runs = self._rest_list(f"{tb_experiment}/runs", "tensorboardRuns")
        if runs is None:
            return None
        found: dict[str, str] = {}
        for run in runs:
            _note(tried, f"{run['name']}/timeSeries")
            series = self._rest_list(f"{run['name']}/timeSeries", "tensorboardTimeSeries") or []
            for item in series:
                display = item.get("displayName", "")
                if not display.startswith("/"):
                    display = "/" + display
                if display in SERIES_KEYS and display not in found:
                    found[display] = item["name"]
        self._series[job_id] = (tb_experiment, found)
        return self._series[job_id]

    def _export_series(self, series_name: str) -> list[dict[str, Any]] | None:
        """Every point of a time series, page by page (`:exportTensorboardTimeSeries`): `:read` samples a series
        longer than its maxDataPoints (10,000 at most) at random, which would drop steps for good."""
        values: list[dict[str, Any]] = []
        token = ""
        while True:
            body = {"pageSize": _MAX_DATA_POINTS, **({"pageToken": token} if token else {})}
            page = self._rest_get(f"{series_name}:exportTensorboardTimeSeries", body=body)
            if page is None:
                return None if not values else values
            values.extend(page.get("timeSeriesDataPoints") or [])
            token = page.get("nextPageToken") or ""
            if not token:
                return values

    def curve_sources(self, job_id: str) -> list[str]:
        """Where curves were looked for, and the job's gcsMetricsUri when it has one: named, not read (its file
        format is not documented), so a run without curves says where to look."""
        uri = self._gcs_metrics.get(job_id)
        return list(self._tried.get(job_id, [])) + ([f"{uri} (gcsMetricsUri, not read)"] if uri else [])

    def read_metrics(self, job_id: str, cursor: str | None) -> MetricsPage:
        last: dict[str, int] = {}
        if cursor:
            try:
                last = {str(k): int(v) for k, v in json.loads(cursor).items()}
            except (ValueError, AttributeError, TypeError):
                raise ProviderError(self.name, f"unreadable metrics cursor {cursor!r}") from None
        found = self._find_series(job_id)
        if found is None:
            return MetricsPage([], cursor)
        points: list[MetricPoint] = []
        for display, series_name in found[1].items():
            key = SERIES_KEYS[display]
            values = self._export_series(series_name)
            if values is None:
                continue
            after = last.get(key, -1)
            seen: set[int] = set()
            for value in values:
                step = _int(value.get("step"))
                scalar = (value.get("scalar") or {}).get("value")
                if step is None or scalar is None or step <= after or step in seen:
                    continue
                seen.add(step)
                points.append(MetricPoint(key, float(scalar), step, _wall_time_ms(value.get("wallTime"))))
        points.sort(key=lambda p: (p.step, p.key))
        for point in points:
            last[point.key] = max(last.get(point.key, -1), point.step)
        next_cursor = json.dumps(last, sort_keys=True) if last else cursor
        return MetricsPage(points, next_cursor)

    # ------------------------------------------------------------------ prediction
    def thinking_budget_for(self, model: str) -> int | None:
        """The thinking budget `predict` asks `model` for (a tuned endpoint thinks like its base model); None: the
        model's own default."""
        base = self.config.tune.base_model if "/endpoints/" in model else model
        return thinking_budget(base, self.config.vertex.thinking_budget)

    def request_tags(self, model: str) -> dict[str, str]:
        """What was asked of the model's thinking, on the run that evaluates it."""
        budget = self.thinking_budget_for(model)
        return {"vertex.thinking_budget": "model default" if budget is None else str(budget)}

    def predict(self, model: str, question: str, context: str) -> Prediction:
        types = self._types
        budget = self.thinking_budget_for(model)
        config = types.GenerateContentConfig(
            system_instruction=SYSTEM_INSTRUCTION,
            temperature=0.0,
            max_output_tokens=self.config.evaluate.max_output_tokens,
            thinking_config=types.ThinkingConfig(thinking_budget=budget) if budget is not None else None,
        )
        prompt = user_prompt(question, context)
        attempted = self._call(
            lambda: self.client.models.generate_content(model=model, contents=prompt, config=config),
            f"generateContent on {model}",
        )
        response = attempted.value
        text, finish = vertex_data.answer_text(response)
        usage = response.usage_metadata
        output_tokens = vertex_data.output_tokens(usage)
        if not text.strip() and finish == "MAX_TOKENS":
            raise ProviderError(self.name, f"generateContent on {model} stopped at MAX_TOKENS before any answer "
                                f"({output_tokens} output tokens, thinking included; thinking budget "
                                f"{'model default' if budget is None else budget}): raise evaluate.max_output_tokens "
                                "or lower vertex.thinking_budget")
        return Prediction(
            text=clean_completion(text),
            latency_ms=attempted.latency_ms,
            input_tokens=getattr(usage, "prompt_token_count", None) if usage else None,
            output_tokens=output_tokens,
            retry_wait_ms=attempted.retry_wait_ms,
            attempts=attempted.attempts,
        )

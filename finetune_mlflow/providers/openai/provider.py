"""OpenAI fine-tuning behind the provider protocol: upload chat JSONL, create a supervised job, poll it, page its
metric events, and answer questions with any chat model (an `ft:` model, a base model, or any OpenAI-compatible
server reached through `openai.base_url` / OPENAI_BASE_URL).

Retries: the SDK client is built with `max_retries=0` and every call goes through `call_with_retries`, so 429/5xx,
timeouts and connection errors are retried with our bounded back-off (honouring `retry-after-ms`/`retry-after`),
retry waits are reported apart from latency, and an exhausted budget names the call and the last status.

Credentials come only from the environment (OPENAI_API_KEY; the SDK reads OPENAI_ORG_ID / OPENAI_PROJECT_ID
itself). We log where they came from, never their value, and scrub key-shaped strings from every error message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai
from openai import OpenAI

from finetune_mlflow import costing
from finetune_mlflow.providers.openai import data as openai_data
from finetune_mlflow.providers.openai import lifecycle as model_lifecycle
from finetune_mlflow.errors import ConfigError, DataError, ProviderError, TrainingClosed
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, clean_completion, user_prompt
from finetune_mlflow.providers.base import (
    ModelLifecycle,
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
from finetune_mlflow.providers.retry import RetryPolicy, call_with_retries, error_headers, retry_after_seconds

if TYPE_CHECKING:
    from finetune_mlflow.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

PROVIDER = "openai"
STATE_MAP = {
    "validating_files": JobState.PENDING,
    "queued": JobState.PENDING,
    "running": JobState.RUNNING,
    # `jobs.pause` (or the dashboard) holds a job: alive, not progressing, until `jobs.resume`.
    "paused": JobState.RUNNING,
    "succeeded": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
}
# A status this code does not know yet is not terminal: the job is watched until it reaches one it knows.
UNKNOWN_STATUS_STATE = JobState.RUNNING
# OpenAI hyperparameter -> the shared knob name.
HYPERPARAMETER_NAMES = {"n_epochs": "epochs", "learning_rate_multiplier": "learning_rate", "batch_size": "batch_size"}
EVENTS_PAGE_SIZE = 100
JOBS_PAGE_SIZE = 100
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# Warn when the training set is smaller than OpenAI's recommended starting point.
RECOMMENDED_MIN_EXAMPLES = 50

_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,}|sess-[A-Za-z0-9_\-]{8,})")


def _redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEY_PATTERN.sub("sk-***", text)


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc="***@" + netloc)
    return urlunsplit(parts._replace(query=""))


def _retry_after_seconds(error: BaseException) -> float | None:
    return retry_after_seconds(error_headers(error))


def _parse_cursor(cursor: str | None) -> tuple[str | None, int | None]:
    if not cursor:
        return None, None
    event_id, sep, step = cursor.rpartition("|")
    if not sep:
        return cursor, None
    try:
        return event_id, int(step)
    except ValueError:
        return cursor, None


def _checkpoint_metrics(metrics: Any) -> dict[str, float]:
    """A checkpoint's metrics under the shared keys (`valid_loss` -> `val_loss`, `full_valid_loss`, ...)."""
    data = metrics.model_dump(exclude_none=True) if metrics is not None else {}
    return {p.key: p.value for p in openai_data.metrics_from_data(data, 0, step=0)}


def _api_key_from_env() -> str:
    api_key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not api_key:
        raise ConfigError(
            "OPENAI_API_KEY is not set: the openai provider needs an API key in the environment "
            "(export OPENAI_API_KEY=sk-... in the shell that runs mlflow; keys never go in config files)"
        )
    return api_key


def _base_url_choice(configured: str | None) -> tuple[str | None, str]:
    """The base_url to pass the SDK (None lets it read OPENAI_BASE_URL or use its default) and where it came from."""
    if configured:
        return configured, "config openai.base_url"
    if os.environ.get("OPENAI_BASE_URL"):
        return None, "env OPENAI_BASE_URL"
    return None, "SDK default"


def _log_credential_sources(base_url: str, base_url_source: str) -> None:
    """Say where each credential came from, never its value."""
    log.info(
        "OpenAI credentials: api key from env OPENAI_API_KEY; organization %s; project %s; base_url %s (%s)",
        "from env OPENAI_ORG_ID" if os.environ.get("OPENAI_ORG_ID") else "not set (key default)",
        "from env OPENAI_PROJECT_ID" if os.environ.get("OPENAI_PROJECT_ID") else "not set (key default)",
        _redact_url(base_url),
        base_url_source,
    )


def _create_job_kwargs(request: TuningRequest, training_file: str, validation_file: str | None) -> dict[str, Any]:
    """fine_tuning.jobs.create arguments; the run id in metadata is what lets a retry or a rerun adopt the job."""
    hyperparameters: dict[str, Any] = {
        "n_epochs": request.epochs,
        "batch_size": request.batch_size if request.batch_size > 0 else "auto",
        "learning_rate_multiplier": request.learning_rate,
    }
    kwargs: dict[str, Any] = dict(
        model=request.base_model,
        training_file=training_file,
        suffix=request.suffix or openai.omit,
        seed=request.seed,
        metadata={"mlflow_run_id": request.run_id},
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    if validation_file:
        kwargs["validation_file"] = validation_file
    return kwargs


def _job_hyperparameters(job: Any) -> Any:
    """The supervised method's hyperparameters, else the legacy top-level ones (older jobs)."""
    hp = None
    if job.method is not None and job.method.supervised is not None:
        hp = job.method.supervised.hyperparameters
    return hp or job.hyperparameters


def _job_tags(job: Any, hp: Any) -> dict[str, str]:
    tags: dict[str, str] = {
        "openai.status": job.status,
        "openai.base_model": job.model,
        "openai.training_file": job.training_file,
    }
    if hp is not None:
        tags["openai.hyperparameters"] = json.dumps(
            {k: v for k, v in hp.model_dump().items() if v is not None}, sort_keys=True
        )
    if job.validation_file:
        tags["openai.validation_file"] = job.validation_file
    if job.result_files:
        tags["openai.result_files"] = ",".join(job.result_files)
    if job.fine_tuned_model:
        tags["openai.fine_tuned_model"] = job.fine_tuned_model
    if job.seed is not None:
        tags["openai.seed"] = str(job.seed)
    return tags


def _job_error(error: Any) -> tuple[str | None, str | None]:
    """A failed job's (code, message); the offending parameter, when named, goes into the message."""
    if error is None or not (error.code or error.message):
        return None, None
    message = error.message or None
    if error.param and message:
        message = f"{message} (param: {error.param})"
    return error.code or None, message


def _event_points(events: list[Any], only_after_step: int | None) -> list[MetricPoint]:
    """The metric points of `metrics` events, ascending by step; with `only_after_step`, later steps only."""
    points: list[MetricPoint] = []
    for event in events:
        data = event.data if isinstance(event.data, dict) else None
        if event.type != "metrics" or not data:
            continue
        for point in openai_data.metrics_from_data(data, int(event.created_at) * 1000):
            if only_after_step is not None and point.step <= only_after_step:
                continue
            points.append(point)
    points.sort(key=lambda p: (p.step, p.timestamp_ms, p.key))
    return points


class OpenAIProvider(ProviderBase):
    """OpenAI fine-tuning and chat completions. `sleep` and `retry_policy` exist so tests need not really wait."""

    serving_packages = ("openai",)
    JOB_ID_PATTERN = re.compile(r"ftjob-[A-Za-z0-9]+")
    JOB_ID_EXAMPLE = "ftjob- and letters or digits"
    max_parallel_jobs = 3  # OpenAI runs about 3 fine-tuning jobs at once per organization; more only queue
    name = "openai"

    @classmethod
    def billed_as(cls, model: str, base_model: str) -> str:
        """A fine-tuned model or checkpoint (`ft:<base>:org:suffix:id[:ckpt-step-N]`) bills under `ft:<base>`."""
        return "ft:" + model.split(":")[1] if model.startswith("ft:") else super().billed_as(model, base_model)

    @classmethod
    def endpoints(cls, config: "Config") -> dict[str, str]:
        """Where the API key goes: `openai.base_url`, else OPENAI_BASE_URL, else the SDK's default host."""
        return {"openai.base_url": config.openai.base_url or os.environ.get("OPENAI_BASE_URL")
                or "https://api.openai.com/v1"}

    def __init__(
        self,
        config: "Config",
        *,
        sleep: Callable[[float], None] = time.sleep,
        retry_policy: RetryPolicy | None = None,
    ):
        self.config = config
        self.max_concurrency = config.evaluate.max_concurrency
        self._sleep = sleep
        api_key = _api_key_from_env()
        self._secrets = (api_key,)
        base_url, base_url_source = _base_url_choice(config.openai.base_url)
        try:
            self._client = OpenAI(
                api_key=api_key,
                base_url=base_url,
                max_retries=0,  # retries are ours: bounded, reported, and excluded from latency
                timeout=config.openai.request_timeout_seconds,
            )
        except openai.OpenAIError as e:
            raise ConfigError(f"cannot build the OpenAI client: {_redact(str(e), self._secrets)}") from None
        _log_credential_sources(str(self._client.base_url), base_url_source)
        backoff = config.evaluate.retry_backoff_seconds
        self._mgmt_policy = retry_policy or RetryPolicy(max_attempts=max(1, config.openai.max_retries + 1),
                                                        initial_backoff_s=backoff)
        self._predict_policy = retry_policy or RetryPolicy(max_attempts=max(1, config.evaluate.request_retries + 1),
                                                           initial_backoff_s=backoff)
        # job id -> `total_steps` of its latest metrics event, and statuses already explained in the log.
        self._total_steps: dict[str, int] = {}
        self._said: set[tuple[str, str]] = set()

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------------------ plumbing

    def _classify(self, error: BaseException) -> ProviderError | None:
        if isinstance(error, openai.APITimeoutError):
            return ProviderError(PROVIDER, "request timed out", retryable=True)
        if isinstance(error, openai.APIConnectionError):
            return ProviderError(PROVIDER, f"connection error ({_redact(str(error), self._secrets)})", retryable=True)
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            code = getattr(error, "code", None)
            body = error.body if isinstance(error.body, dict) else {}
            server_message = body.get("message") if isinstance(body.get("message"), str) else None
            message = _redact(server_message or getattr(error, "message", None) or str(error), self._secrets)
            retryable = status in RETRYABLE_STATUSES or status >= 500
            if status == 429 and code == "insufficient_quota":
                retryable = False
                message += " (out of quota: add credits or raise the project's budget; retrying will not help)"
            elif status == 401:
                message += " (check OPENAI_API_KEY, and OPENAI_ORG_ID/OPENAI_PROJECT_ID if set)"
            return ProviderError(
                PROVIDER, f"HTTP {status}: {message}", status=status, request_id=error.request_id, retryable=retryable
            )
        return None

    def _call(self, what: str, call: Callable[[], T], *, policy: RetryPolicy | None = None):
        return call_with_retries(
            call,
            classify=self._classify,
            what=what,
            policy=policy or self._mgmt_policy,
            retry_after=_retry_after_seconds,
            sleep=self._sleep,
        )

    def _value(self, what: str, call: Callable[[], T]) -> T:
        return self._call(what, call).value

    # ------------------------------------------------------------------------------------------ preflight

    def _data_paths(self, request: TuningRequest) -> tuple[Path, Path | None]:
        base = Path(request.prepared_dir) / "openai"
        train = base / "train.jsonl"
        validation = base / "validation.jsonl"
        return train, (validation if validation.exists() else None)

    def preflight(self, request: TuningRequest) -> PreflightReport:
        train_path, validation_path = self._data_paths(request)
        train = openai_data.load_chat_jsonl(train_path)
        validation = openai_data.load_chat_jsonl(validation_path, min_examples=1) if validation_path else []
        limit = self.config.openai.context_limit_tokens
        train_est = openai_data.estimate_dataset_tokens(train, limit)
        valid_est = openai_data.estimate_dataset_tokens(validation, limit)
        billed = costing.billed_tokens(train_est.total_tokens, request.epochs)
        price = openai_data.training_price(request.base_model, self.config.openai.training_price_per_million_tokens)
        cost = costing.estimate_cost_usd(billed, price)
        warnings: list[str] = []
        for label, est in (("training", train_est), ("validation", valid_est)):
            if est.n_over_limit:
                warnings.append(
                    f"{est.n_over_limit} {label} examples exceed openai.context_limit_tokens={limit} "
                    f"(longest ~{est.max_example_tokens} tokens); OpenAI truncates them"
                )
        if len(train) < RECOMMENDED_MIN_EXAMPLES:
            warnings.append(
                f"{len(train)} training examples; OpenAI recommends starting with at least {RECOMMENDED_MIN_EXAMPLES}"
            )
        if price is None:
            warnings.append(
                f"no price for {request.base_model} under openai.training_price_per_million_tokens (exact names "
                "only): no cost estimate, and a max_cost_usd guard refuses the job"
            )
        return PreflightReport(
            n_train=len(train),
            n_validation=len(validation),
            estimated_train_tokens=train_est.total_tokens,
            estimated_billed_tokens=billed,
            estimated_cost_usd=cost,
            warnings=warnings,
        )

    # ------------------------------------------------------------------------------------------ jobs

    def _upload(self, path: Path) -> str:
        content = path.read_bytes()
        file = self._value(
            f"files.create({path.name}, purpose=fine-tune)",
            lambda: self._client.files.create(file=(path.name, content, "application/jsonl"), purpose="fine-tune"),
        )
        log.info("uploaded %s as %s (%d bytes)", path, file.id, file.bytes)
        return file.id

    def _find_job_for_run(self, run_id: str, training_file: str) -> Any | None:
        """A job this run already created with these uploads (a create whose response was lost), else None."""
        page = self._client.fine_tuning.jobs.list(metadata={"mlflow_run_id": run_id}, limit=10)
        for job in page.data:
            if job.training_file == training_file:
                return job
        return None

    def _adopt_earlier_job(self, run_id: str) -> TuningJob | None:
        """A crash after creating the job but before the run recorded its id leaves a job tagged with this run in
        its metadata: adopt it instead of paying for a second one."""
        earlier = self._value(
            f"fine_tuning.jobs.list(metadata.mlflow_run_id={run_id})",
            lambda: self._client.fine_tuning.jobs.list(metadata={"mlflow_run_id": run_id}, limit=10),
        )
        for job in earlier.data:
            if (job.metadata or {}).get("mlflow_run_id") == run_id:
                log.warning("run %s already created job %s; adopting it", run_id, job.id)
                return self._to_tuning_job(job, final_details=False)
        return None

    def _create_job(self, request: TuningRequest, kwargs: dict[str, Any]) -> Any:
        """Create with retries; job creation is not idempotent, so a retry first adopts a job a lost response
        already created."""
        attempts = {"n": 0}

        def create() -> Any:
            attempts["n"] += 1
            if attempts["n"] > 1:
                existing = self._find_job_for_run(request.run_id, kwargs["training_file"])
                if existing is not None:
                    log.warning("job creation response was lost; adopting %s created for this run", existing.id)
                    return existing
            return self._client.fine_tuning.jobs.create(**kwargs)

        try:
            return self._value(f"fine_tuning.jobs.create(model={request.base_model})", create)
        except ProviderError as e:
            closed = model_lifecycle.refused_creation(e, request.base_model)  # fine-tuning closed to this account
            if closed is not None:
                raise closed from None
            raise

    def start_job(self, request: TuningRequest) -> TuningJob:
        train_path, validation_path = self._data_paths(request)
        if not train_path.exists():
            raise DataError(train_path, None, "file not found; run the prepare step first")
        adopted = self._adopt_earlier_job(request.run_id)
        if adopted is not None:
            return adopted
        training_file = self._upload(train_path)
        validation_file = self._upload(validation_path) if validation_path else None
        try:
            job = self._create_job(request, _create_job_kwargs(request, training_file, validation_file))
        except TrainingClosed:
            model_lifecycle.discard_uploads(self._client.files.delete, [f for f in (training_file, validation_file)
                                                                        if f])
            raise
        log.info("created fine-tuning job %s (model %s, training file %s)", job.id, job.model, training_file)
        return self._to_tuning_job(job, final_details=False)

    def get_job(self, job_id: str) -> TuningJob:
        job = self._value(f"fine_tuning.jobs.retrieve({job_id})", lambda: self._client.fine_tuning.jobs.retrieve(job_id))
        return self._to_tuning_job(job, final_details=True)

    def _say_once(self, job_id: str, status: str, message: str) -> None:
        if (job_id, status) not in self._said:
            self._said.add((job_id, status))
            log.warning(message)

    def _to_tuning_job(self, job: Any, *, final_details: bool) -> TuningJob:
        state = STATE_MAP.get(job.status)
        if state is None:
            state = UNKNOWN_STATUS_STATE
            self._say_once(job.id, job.status, f"job {job.id} has status {job.status!r}, which this version does not "
                           "know; treating it as not finished and watching on")
        elif job.status == "paused":
            self._say_once(job.id, job.status, f"job {job.id} is paused: alive but not training until it is "
                           "resumed (dashboard, or fine_tuning.jobs.resume); the tune step keeps watching")
        hp = _job_hyperparameters(job)
        tags = _job_tags(job, hp)
        metrics: dict[str, float] = {}
        if job.trained_tokens is not None:
            # "The total number of billable tokens processed by this job" (epochs included): cost_train_usd.
            metrics["trained_tokens"] = metrics["billed_training_tokens"] = float(job.trained_tokens)
        if final_details and state is JobState.SUCCEEDED:
            self._add_success_details(job, tags, metrics)
        error_code, error_message = _job_error(job.error)
        return TuningJob(
            job_id=job.id,
            state=state,
            provider_status=job.status,
            tuned_model=job.fine_tuned_model,
            error_code=error_code,
            error_message=error_message,
            tags=tags,
            metrics=metrics,
            base_model=job.model,
            hyperparameters=shared_hyperparameters(hp.model_dump() if hp is not None else {}, HYPERPARAMETER_NAMES),
            total_steps=self._total_steps.get(job.id),
        )

    def _add_success_details(self, job: Any, tags: dict[str, str], metrics: dict[str, float]) -> None:
        """Checkpoints and full-validation metrics exist only once the job succeeded, and cost extra calls."""
        checkpoints = self._checkpoints(job.id)
        if checkpoints:
            tags["openai.checkpoints"] = ",".join(
                f"{c.step_number}={c.fine_tuned_model_checkpoint}" for c in checkpoints
            )[:5000]
        metrics.update(self._final_metrics(job, checkpoints))

    def _checkpoints(self, job_id: str) -> list[Any]:
        """Every checkpoint of a job, oldest step first."""
        page = self._value(
            f"fine_tuning.jobs.checkpoints.list({job_id})",
            lambda: self._client.fine_tuning.jobs.checkpoints.list(job_id, limit=100),
        )
        out = list(page.data)
        while page.has_next_page():
            page = self._value(f"fine_tuning.jobs.checkpoints.list({job_id}) next page", page.get_next_page)
            out.extend(page.data)
        return sorted(out, key=lambda c: c.step_number)

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The job's checkpoints (OpenAI keeps one at the end of each of the last three epochs, each a usable
        `ft:...:ckpt-step-N` model), oldest first. Epochs are not reported: they are placed by step, the last
        checkpoint ending the job's last epoch (`n_epochs`), so each is `round(step * n_epochs / last step)`."""
        raw = self._checkpoints(job_id)
        if not raw:
            return []
        job = self._value(f"fine_tuning.jobs.retrieve({job_id})", lambda: self._client.fine_tuning.jobs.retrieve(job_id))
        hp = job.method.supervised.hyperparameters if job.method and job.method.supervised else job.hyperparameters
        epochs = getattr(hp, "n_epochs", None) if hp is not None else None
        last = max(c.step_number for c in raw)
        return [Checkpoint(
            checkpoint_id=c.id, model=c.fine_tuned_model_checkpoint, step=int(c.step_number),
            epoch=round(c.step_number * epochs / last) if isinstance(epochs, int) and last else None,
            metrics=_checkpoint_metrics(c.metrics),
        ) for c in raw]

    def _final_metrics(self, job: Any, checkpoints: list[Any]) -> dict[str, float]:
        """full_valid_* at success: newest metrics event carrying them, else the last checkpoint, else result file."""
        wanted = ("full_valid_loss", "full_valid_mean_token_accuracy")
        page = self._value(
            f"fine_tuning.jobs.list_events({job.id})",
            lambda: self._client.fine_tuning.jobs.list_events(job.id, limit=EVENTS_PAGE_SIZE),
        )
        for event in page.data:  # newest first
            data = event.data if isinstance(event.data, dict) else {}
            if event.type == "metrics" and any(data.get(k) is not None for k in wanted):
                return {k: float(data[k]) for k in wanted if data.get(k) is not None}
        for checkpoint in reversed(checkpoints):
            found = {k: getattr(checkpoint.metrics, k, None) for k in wanted}
            if any(v is not None for v in found.values()):
                return {k: float(v) for k, v in found.items() if v is not None}
        if job.validation_file and job.result_files:
            points = self.result_file_metrics(job.id, job=job)
            out: dict[str, float] = {}
            for point in points:  # step order: the last value wins
                if point.key in wanted:
                    out[point.key] = point.value
            return out
        return {}

    def read_metrics(self, job_id: str, cursor: str | None) -> MetricsPage:
        """New metric points since `cursor`, ascending by step.

        The events endpoint lists newest first and its `after` parameter pages towards older events, so "since"
        cannot be asked of the API directly. The cursor is therefore `"<newest consumed event id>|<max step>"`:
        a call reads pages from the newest event down until it meets that event id (everything above it is new),
        then returns the id of the newest event it saw as the next cursor. Event ids are stable and new events are
        only ever prepended, so no event is read twice and none is skipped, however many pages arrive between
        calls. Should the remembered event vanish from the list, the max step guards against re-reading: only
        metrics with a larger step are returned.
        """
        cursor_id, cursor_step = _parse_cursor(cursor)
        new_events, reached = self._events_since(job_id, cursor_id)
        found = reached or cursor_id is None
        if not found:
            log.warning(
                "metrics cursor event %s not found for job %s; returning only steps after %s",
                cursor_id, job_id, cursor_step,
            )
        points = _event_points(new_events, None if found else cursor_step)
        total = openai_data.total_steps(new_events)
        if total is not None:
            self._total_steps[job_id] = total
        if not new_events:
            return MetricsPage(points=[], next_cursor=cursor)
        max_step = max([p.step for p in points] + ([cursor_step] if cursor_step is not None else []), default=None)
        next_cursor = new_events[0].id + (f"|{max_step}" if max_step is not None else "")
        return MetricsPage(points=points, next_cursor=next_cursor)

    def _events_since(self, job_id: str, cursor_id: str | None) -> tuple[list[Any], bool]:
        """Events newer than `cursor_id`, newest first, and whether that event was met (older ones were consumed)."""
        new_events: list[Any] = []
        page = self._value(
            f"fine_tuning.jobs.list_events({job_id})",
            lambda: self._client.fine_tuning.jobs.list_events(job_id, limit=EVENTS_PAGE_SIZE),
        )
        while True:
            for event in page.data:
                if cursor_id is not None and event.id == cursor_id:
                    return new_events, True
                new_events.append(event)
            if not page.has_next_page():
                return new_events, False
            page = self._value(f"fine_tuning.jobs.list_events({job_id}) next page", page.get_next_page)

    def result_file_metrics(self, job_id: str, *, job: Any | None = None) -> list[MetricPoint]:
        """Download and parse the job's result file(s) (step metrics CSV), e.g. to fill steps the events missed.
        Points are stamped with the job's finished_at (the file carries no per-step time)."""
        if job is None:
            job = self._value(
                f"fine_tuning.jobs.retrieve({job_id})", lambda: self._client.fine_tuning.jobs.retrieve(job_id)
            )
        timestamp_ms = int(job.finished_at or job.created_at) * 1000
        points: list[MetricPoint] = []
        for file_id in job.result_files or []:
            response = self._value(f"files.content({file_id})", lambda fid=file_id: self._client.files.content(fid))
            points.extend(
                openai_data.parse_result_file(response.read(), timestamp_ms=timestamp_ms, source=f"openai:{file_id}")
            )
        points.sort(key=lambda p: (p.step, p.key))
        return points

    def list_jobs(self) -> Iterator[str]:
        page = self._value("fine_tuning.jobs.list", lambda: self._client.fine_tuning.jobs.list(limit=JOBS_PAGE_SIZE))
        while True:
            for job in page.data:
                yield job.id
            if not page.has_next_page():
                return
            page = self._value("fine_tuning.jobs.list next page", page.get_next_page)

    def cancel_job(self, job_id: str) -> TuningJob:
        """Not part of the protocol; handy for cleaning up a job launched by mistake."""
        job = self._value(f"fine_tuning.jobs.cancel({job_id})", lambda: self._client.fine_tuning.jobs.cancel(job_id))
        return self._to_tuning_job(job, final_details=False)

    def lifecycle(self, model: str) -> ModelLifecycle | None:
        return model_lifecycle.retrieve(model, lambda: self._value(f"models.retrieve({model})",
                                                                    lambda: self._client.models.retrieve(model)))

    # ------------------------------------------------------------------------------------------ predict

    def predict(self, model: str, question: str, context: str) -> Prediction:
        messages = [
            {"role": "system", "content": SYSTEM_INSTRUCTION},
            {"role": "user", "content": user_prompt(question, context)},
        ]
        attempted = self._call(
            f"chat.completions.create(model={model})",
            lambda: self._client.chat.completions.create(
                model=model,
                messages=messages,
                temperature=0,
                # `max_tokens` is deprecated and refused by reasoning models; this one counts reasoning tokens too.
                max_completion_tokens=self.config.evaluate.max_output_tokens,
            ),
            policy=self._predict_policy,
        )
        response = attempted.value
        text = response.choices[0].message.content if response.choices else None
        usage = response.usage
        return Prediction(
            text=clean_completion(text),
            latency_ms=attempted.latency_ms,
            input_tokens=usage.prompt_tokens if usage is not None else None,
            output_tokens=usage.completion_tokens if usage is not None else None,
            retry_wait_ms=attempted.retry_wait_ms,
            attempts=attempted.attempts,
        )

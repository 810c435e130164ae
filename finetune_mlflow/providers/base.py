"""The provider protocol: the few methods every backend implements, and the normalized types they return.

The step modules (tune, evaluate, sync) talk only to this protocol, so the local, OpenAI and Vertex backends
are driven by one code path: start or reattach to a job, poll its state, page new metric points with a cursor,
and predict with a model id.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from finetune_mlflow.errors import ConfigError, FinetuneError


class NotSupported(FinetuneError):
    """A provider lacks an optional capability (cancel, checkpoints, ...)."""


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class MetricPoint:
    """One point of a training curve under a shared key (`train_loss`, `val_loss`, ...)."""

    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(frozen=True)
class MetricsPage:
    """New points since `cursor`; pass `next_cursor` next time so nothing is read twice."""

    points: list[MetricPoint]
    next_cursor: str | None


@dataclass(frozen=True)
class TuningJob:
    job_id: str
    state: JobState
    # The provider's own status word (e.g. OpenAI "validating_files"), logged as a tag on transitions.
    provider_status: str
    # What `predict` takes for the tuned model: an `ft:` id, a Vertex endpoint, a local weights path.
    tuned_model: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    # Job-level facts worth a tag (model resource, experiment, checkpoints summary); no secrets.
    tags: dict[str, str] = field(default_factory=dict)
    # Job-level numbers (trained_tokens, completed_step_count, full_valid_loss) logged as metrics.
    metrics: dict[str, float] = field(default_factory=dict)
    # The model the job tuned, as the provider names it without its resource path (e.g. "gemini-2.5-flash").
    base_model: str | None = None
    # What the job was trained with, under the shared knob names (`epochs`, `learning_rate`, `batch_size`,
    # `adapter_size`), so a synced job's params compare with a tune run's.
    hyperparameters: dict[str, str] = field(default_factory=dict)
    # Training steps the whole job will take, when the provider says (progress and ETA on the terminal).
    total_steps: int | None = None


@dataclass(frozen=True)
class TuningRequest:
    run_id: str
    base_model: str
    # The `prepared/` directory: canonical JSONL plus each provider's format under its own subdirectory.
    prepared_dir: Path
    epochs: int
    learning_rate: float
    # 0 means the provider's default ("auto").
    batch_size: int
    seed: int
    suffix: str


@dataclass(frozen=True)
class PreflightReport:
    """What a job will cost before it is launched; tune refuses to launch above `max_cost_usd`."""

    n_train: int
    n_validation: int
    estimated_train_tokens: int
    estimated_billed_tokens: int
    estimated_cost_usd: float | None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Prediction:
    text: str
    # Around the successful provider call only; retry waits are reported separately.
    latency_ms: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    retry_wait_ms: float = 0.0
    attempts: int = 1


@runtime_checkable
class Provider(Protocol):
    name: str
    # How many requests evaluate may have in flight at once (1 for in-process models).
    max_concurrency: int

    def preflight(self, request: TuningRequest) -> PreflightReport:
        """Validate the provider-format data and estimate cost, before any upload. Raises DataError/ConfigError."""

    def start_job(self, request: TuningRequest) -> TuningJob:
        """Upload data and create the job; called once per run, the job id is stored on the run right after."""

    def get_job(self, job_id: str) -> TuningJob:
        """Current state of a job, normalized."""

    def read_metrics(self, job_id: str, cursor: str | None) -> MetricsPage:
        """Metric points after `cursor` (None: from the start), in step order, following provider pagination."""

    def predict(self, model: str, question: str, context: str) -> Prediction:
        """Answer one question with `model` (base model name or tuned model id) using the shared prompt."""

    def list_jobs(self) -> Iterator[str]:
        """Every tuning job id the credentials can see (for `sync -P job_id=all`)."""


@dataclass(frozen=True)
class Checkpoint:
    """An intermediate model a job kept (OpenAI `ckpt-step-N`, a Vertex checkpoint, a local epoch)."""

    checkpoint_id: str
    model: str  # what `predict` takes
    step: int
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelLifecycle:
    """When a model stops answering or stops accepting new tuning jobs, as its provider (or a dated config
    entry) says; never a date written in code."""

    model: str
    # The day the model stops answering (OpenAI `shutdown_date`, Vertex/Gemini retirement), None when unknown.
    shutdown_date: dt.date | None
    # The provider's stage word (e.g. "active", "deprecated", "legacy", "retired"), None when not reported.
    stage: str | None
    # Whether the provider accepts new tuning jobs on this model; None when unknown.
    accepts_new_jobs: bool | None
    # Where the facts came from: "openai:models.retrieve", "config:vertex.lifecycle (2026-09-25)", ...
    source: str
    checked_at: dt.datetime

    def days_left(self, today: dt.date) -> int | None:
        """Days until shutdown counted from `today` (negative once past), None when no date is known."""
        return None if self.shutdown_date is None else (self.shutdown_date - today).days


# The artifact name under which a registered version carries the files `model_artifacts` names.
MODEL_ARTIFACT = "weights"


class ProviderBase:
    """The optional capabilities with their "not supported" defaults; a provider overrides what it has."""

    name = "provider"
    # How many of this provider's jobs a sweep runs at once by default.
    max_parallel_jobs = 1
    # Distributions a registered version needs to serve this provider's models (pinned at registration).
    serving_packages: tuple[str, ...] = ()
    # True for an in-process model that answers many questions per call faster than one by one (a GPU batch):
    # the evaluator then calls `predict_batch` instead of fanning `predict` out over threads.
    batched_prediction = False

    def predict_batch(self, model: str, pairs: list[tuple[str, str]]) -> list[Prediction]:
        return [self.predict(model, question, context) for question, context in pairs]

    def predict(self, model: str, question: str, context: str) -> Prediction:
        raise NotImplementedError
    # What this provider's job ids look like (checked before any call: an id is never a path or a URL).
    JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
    JOB_ID_EXAMPLE = "a job id"

    def check_job_id(self, job_id: str) -> str:
        """The job id as the provider's calls take it, or a ConfigError before anything reads or requests it."""
        if not self.JOB_ID_PATTERN.fullmatch(job_id):
            raise ConfigError(f"{self.name} job id {job_id[:200]!r} is not a {self.name} job id (expected "
                              f"{self.JOB_ID_EXAMPLE}); nothing was read or requested")
        return job_id

    def result_file_metrics(self, job_id: str) -> list[MetricPoint]:
        """Step metrics kept outside the event stream (OpenAI's result file); none by default."""
        return []

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The job's intermediate models, oldest first; none by default."""
        return []

    def curve_sources(self, job_id: str) -> list[str]:
        """Where the job's curves were looked for (resource names), to say so when none was found."""
        return []

    def cancel_job(self, job_id: str) -> TuningJob:
        raise NotSupported(f"the {self.name} provider cannot cancel jobs; stop {job_id} in its console")

    def lifecycle(self, model: str) -> ModelLifecycle | None:
        """The model's shutdown/retirement facts from the provider or dated config; None where nothing retires
        (local and open-weights models) or nothing is known."""
        return None

    def request_tags(self, model: str) -> dict[str, str]:
        """Request settings chosen per model that change answers, latency or cost (Vertex: the thinking budget), as
        tags for the run that evaluates `model`; none by default."""
        return {}

    def model_artifacts(self, model: str) -> dict[str, str]:
        """Local files a registered version must carry to serve `model` (name -> path); none for hosted models."""
        return {}

    def same_model(self, model: str, other: str) -> bool:
        """Whether two model ids answer identically (a checkpoint that is the final model); by id by default."""
        return model == other

    @classmethod
    def model_from_artifact(cls, path: str) -> tuple[str, dict[str, str]]:
        """The model id to predict with when a served version carries its model at `path`, and the config
        overrides that make it resolvable there."""
        return path, {}

def shared_hyperparameters(values: dict, names: dict[str, str]) -> dict[str, str]:
    """A provider's hyperparameters renamed to the shared knob names (unknown ones keep their own), as strings;
    unset values and "auto" placeholders left for the provider to choose are dropped."""
    return {names.get(k, k): str(getattr(v, "value", v)) for k, v in values.items() if v is not None}

"""Together AI fine-tuning behind the provider protocol: a LoRA SFT job on the prepared conversational files,
polled to the end, its curves read from the metrics endpoint, its checkpoints offered as candidates, and every
model (base, tuned, checkpoint) asked through Together's OpenAI-compatible chat completions.

Lifecycle: Together's model catalog reports a status (deprecated among them) and whether a model is offered for
fine-tuning, never a shutdown date; `lifecycle` returns those facts as they are.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time

import together
from typing import TYPE_CHECKING, Any, Callable, Iterator

from finetune_mlflow.errors import ConfigError, DataError
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, clean_completion, user_prompt
from finetune_mlflow.providers.base import (
    Checkpoint,
    JobState,
    MetricsPage,
    ModelLifecycle,
    Prediction,
    PreflightReport,
    ProviderBase,
    TuningJob,
    TuningRequest,
)
from finetune_mlflow.providers.retry import RetryPolicy
from finetune_mlflow.providers.together import curves, jobs, lifecycle, limits, staging
from finetune_mlflow.providers.together.transport import Transport

if TYPE_CHECKING:
    from finetune_mlflow.config import Config

log = logging.getLogger(__name__)


class TogetherProvider(ProviderBase):
    name = "together"
    serving_packages = ("together",)
    JOB_ID_PATTERN = re.compile(r"ft-[A-Za-z0-9-]{1,100}")
    JOB_ID_EXAMPLE = "ft- and letters, digits or dashes"

    def __init__(self, config: "Config", *, sleep: Callable[[float], None] = time.sleep,
                 retry_policy: RetryPolicy | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.settings = config.together
        self.max_concurrency = config.evaluate.max_concurrency
        self._io = Transport(config, sleep=sleep, retry_policy=retry_policy)
        self._client = self._io.client
        self._clock = clock
        self._limits: dict[str, Any] = {}
        self._estimates: dict[str, float] = {}

    def close(self) -> None:
        self._io.close()

    # ------------------------------------------------------------------------------------------ before launch

    def _model_limits(self, model: str) -> Any:
        if model not in self._limits:
            self._limits[model] = self._io.value(f"fine_tuning.model_limits({model})",
                                                 lambda: self._client.fine_tuning.model_limits(model_name=model))
        return self._limits[model]

    def preflight(self, request: TuningRequest) -> PreflightReport:
        """Check the data, the settings against the model's limits, and price it; nothing is uploaded."""
        staged = staging.stage(request)
        limits.check_limits(self._model_limits(request.base_model), request, self.settings,
                            max(staged.train_tokens.longest, staged.validation_tokens.longest),
                            staged.validation is not None)
        return staging.report(staged, request, self.settings)

    def _service_estimate(self, kwargs: dict[str, Any]) -> float | None:
        """The service's own price for these uploads; refuse above tune.max_cost_usd or when it says the
        account may not proceed. None when it cannot estimate (e.g. files still being validated)."""
        lora = {"type": "Lora", "lora_r": self.settings.lora_r, "lora_alpha": self.settings.lora_alpha}
        estimate = self._io.value("fine_tuning.estimate_price", lambda: self._client.fine_tuning.estimate_price(
            training_file=kwargs["training_file"], validation_file=kwargs.get("validation_file") or together.omit,
            model=kwargs["model"], n_epochs=kwargs["n_epochs"], n_evals=kwargs.get("n_evals", 0),
            training_method={"method": "sft", "train_on_inputs": "auto"}, training_type=lora))
        if estimate.estimation_available is False:
            log.warning("Together could not estimate the price (%s)", estimate.unavailable_reason)
            return None
        price, limit = estimate.estimated_total_price, self.config.tune.max_cost_usd
        if estimate.allowed_to_proceed is False:
            raise ConfigError(f"Together estimates ${price} for this job, above the account's credit limit "
                              f"(${estimate.user_limit}); no job was created")
        if price is not None and limit > 0 and price > limit:
            raise ConfigError(f"Together estimates ${price:.2f} for this job, above tune.max_cost_usd=${limit:g}; "
                              "no job was created (lower data.max_examples or tune.epochs, or raise the limit)")
        return None if price is None else float(price)

    # ------------------------------------------------------------------------------------------ jobs

    def _job_with_suffix(self, suffix: str) -> Any | None:
        listed = self._io.value("fine_tuning.list", self._client.fine_tuning.list)
        return next((job for job in listed.data if job.suffix == suffix), None)

    def start_job(self, request: TuningRequest) -> TuningJob:
        train_path, validation_path = staging.paths(request)
        if not train_path.exists():
            raise DataError(train_path, None, "file not found; run the prepare step first")
        suffix = limits.run_suffix(request.suffix, request.run_id)
        earlier = self._job_with_suffix(suffix)
        if earlier is not None:  # a crash after create, before the run recorded the id: no second job
            log.warning("run %s already created job %s; adopting it", request.run_id, earlier.id)
            return self.get_job(earlier.id)
        model_limits = self._model_limits(request.base_model)
        training_file = staging.upload(self._io, train_path)
        validation_file = staging.upload(self._io, validation_path) if validation_path else None
        kwargs = limits.create_kwargs(request, self.settings, training_file, validation_file, model_limits)
        estimate = self._service_estimate(kwargs)
        attempts = {"n": 0}

        def create() -> Any:
            attempts["n"] += 1
            if attempts["n"] > 1:  # creation is not idempotent: a lost response may have created it
                found = self._job_with_suffix(suffix)
                if found is not None:
                    return found
            try:
                return self._client.fine_tuning.create(**kwargs)
            except ValueError as e:  # the SDK's own request checks (create_finetune_request), before any POST
                raise ConfigError(f"the together SDK refused the job settings: {e}; no job was created") from None

        job = self._io.value(f"fine_tuning.create(model={request.base_model})", create)
        if estimate is not None:
            self._estimates[job.id] = estimate
        log.info("created Together job %s (model %s, training file %s)", job.id, request.base_model, training_file)
        return self.get_job(job.id)

    def get_job(self, job_id: str) -> TuningJob:
        job = self._io.value(f"fine_tuning.retrieve({job_id})", lambda: self._client.fine_tuning.retrieve(job_id))
        failed = jobs.STATE_MAP.get(jobs.status_of(job)) is JobState.FAILED
        events = self._events(job_id) if failed else None  # the job object has no error field; its events do
        tuning_job = jobs.to_tuning_job(job, events)
        if job_id in self._estimates:
            tuning_job.metrics["service_estimated_cost_usd"] = self._estimates[job_id]
        return tuning_job

    def _events(self, job_id: str) -> list[Any]:
        return list(self._io.value(f"fine_tuning.list_events({job_id})",
                                   lambda: self._client.fine_tuning.list_events(job_id)).data)

    def read_metrics(self, job_id: str, cursor: str | None) -> MetricsPage:
        step, _ = curves.parse_cursor(cursor)
        kwargs = {"global_step_from": step} if step is not None else {}
        rows = self._io.value(f"fine_tuning.list_metrics({job_id})",
                              lambda: self._client.fine_tuning.list_metrics(job_id, **kwargs)).metrics or []
        points, next_cursor = curves.new_points(rows, cursor, int(self._clock() * 1000))
        return MetricsPage(points=points, next_cursor=next_cursor)

    def curve_sources(self, job_id: str) -> list[str]:
        return [f"GET /v1/fine-tunes/{job_id}/metrics (train/loss, eval/loss by global step)"]

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        raw = self._io.value(f"fine_tuning.list_checkpoints({job_id})",
                             lambda: self._client.fine_tuning.list_checkpoints(job_id)).data
        if not raw:
            return []
        job = self._io.value(f"fine_tuning.retrieve({job_id})", lambda: self._client.fine_tuning.retrieve(job_id))
        return jobs.candidates(raw, jobs.tuned_model(job), job.n_epochs)

    def list_jobs(self) -> Iterator[str]:
        """Every job the key can see: the list endpoint answers them all at once (it has no pages)."""
        listed = self._io.value("fine_tuning.list", self._client.fine_tuning.list)
        for job in sorted(listed.data, key=lambda j: j.created_at, reverse=True):
            yield job.id

    def cancel_job(self, job_id: str) -> TuningJob:
        self._io.value(f"fine_tuning.cancel({job_id})", lambda: self._client.fine_tuning.cancel(job_id))
        return self.get_job(job_id)

    def lifecycle(self, model: str) -> ModelLifecycle | None:
        """The catalog's facts about `model` (every page of the search), None when the catalog does not list it."""
        page = self._io.value(f"models.list_supported(search={model})",
                              lambda: self._client.models.list_supported(search=model))
        while True:
            found = next((entry for entry in page.data if lifecycle.matches(entry, model)), None)
            if found is not None:
                return lifecycle.from_catalog(found, model, dt.datetime.now(dt.timezone.utc))
            if not page.has_next_page():
                return None
            page = self._io.value(f"models.list_supported(search={model}) next page", page.get_next_page)

    # ------------------------------------------------------------------------------------------ predict

    def predict(self, model: str, question: str, context: str) -> Prediction:
        messages = [{"role": "system", "content": SYSTEM_INSTRUCTION},
                    {"role": "user", "content": user_prompt(question, context)}]
        attempted = self._io.call(f"chat.completions.create(model={model})", lambda: self._client.chat.completions
                                  .create(model=model, messages=messages, temperature=0,
                                          max_tokens=self.config.evaluate.max_output_tokens), predict=True)
        response = attempted.value
        text = response.choices[0].message.content if response.choices else None
        usage = response.usage
        return Prediction(text=clean_completion(text if isinstance(text, str) else None),
                          latency_ms=attempted.latency_ms,
                          input_tokens=usage.prompt_tokens if usage is not None else None,
                          output_tokens=usage.completion_tokens if usage is not None else None,
                          retry_wait_ms=attempted.retry_wait_ms, attempts=attempted.attempts)

"""Pure: a Together fine-tune job (the SDK's FinetuneResponse / list Data) as the normalized TuningJob, the
failure reason its events carry, and its checkpoints as candidate models."""

from __future__ import annotations

from typing import Any, Iterable

from finetune_mlflow.errors import ProviderError
from finetune_mlflow.providers.base import Checkpoint, JobState, TuningJob, shared_hyperparameters

# Every status in the SDK's FinetuneResponse literal plus the lib enum's `user_error`.
STATE_MAP = {
    "pending": JobState.PENDING,
    "queued": JobState.PENDING,
    "running": JobState.RUNNING,
    "compressing": JobState.RUNNING,
    "uploading": JobState.RUNNING,
    "cancel_requested": JobState.RUNNING,
    "completed": JobState.SUCCEEDED,
    "error": JobState.FAILED,
    "user_error": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
}
HYPERPARAMETER_NAMES = {"n_epochs": "epochs", "learning_rate": "learning_rate", "batch_size": "batch_size",
                        "lora_r": "adapter_size"}
ERROR_EVENTS = frozenset({"job_error", "job_user_error", "billing_limit"})
NANODOLLARS = 1e9  # `total_price` unit (the SDK's own finetune_price_to_dollars divides by 1e9)


def status_of(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


def tuned_model(job: Any) -> str | None:
    """What chat completions take for the job's model: its output name (serverless LoRA or an endpoint)."""
    return getattr(job, "x_model_output_name", None) or getattr(job, "output_name", None)


def failure_reason(events: Iterable[Any]) -> tuple[str | None, str | None]:
    """(code, message) of the newest error event: the job object itself carries no error field."""
    found = None
    for event in events:
        kind = str(getattr(event.type, "value", event.type) or "").lower()
        if kind in ERROR_EVENTS or str(event.level or "").lower() == "error":
            if found is None or str(event.created_at or "") >= str(found.created_at or ""):
                found = event
    if found is None:
        return None, None
    return str(getattr(found.type, "value", found.type) or "job_error").lower(), found.message or None


def total_steps(events: Iterable[Any]) -> int | None:
    steps = [e.total_steps for e in events if getattr(e, "total_steps", None)]
    return int(max(steps)) if steps else None


def _hyperparameters(job: Any) -> dict[str, Any]:
    values = {"n_epochs": job.n_epochs, "learning_rate": job.learning_rate, "batch_size": job.batch_size}
    training_type = getattr(job, "training_type", None)
    if training_type is not None and getattr(training_type, "type", None) == "Lora":
        values["lora_r"] = training_type.lora_r
    return values


def job_numbers(job: Any) -> dict[str, float]:
    """Token counts and the service's own price, as the job reports them once tokenization is done."""
    out: dict[str, float] = {}
    if job.token_count is not None:
        out["trained_tokens"] = float(job.token_count)
        # Billing counts every epoch's tokens (docs: fine-tuning pricing), so cost_train_usd prices this.
        out["billed_training_tokens"] = float(job.token_count) * float(job.n_epochs or 1)
    if job.total_price is not None:
        out["provider_total_price_usd"] = float(job.total_price) / NANODOLLARS
    for name in ("steps_completed", "epochs_completed", "evals_completed"):
        value = getattr(job, name, None)
        if value is not None:
            out[name] = float(value)
    return out


def to_tuning_job(job: Any, events: list[Any] | None = None) -> TuningJob:
    status = status_of(job)
    state = STATE_MAP.get(status)
    if state is None:
        raise ProviderError("together", f"job {job.id} has unknown status {status!r}")
    code, message = failure_reason(events or []) if state is JobState.FAILED else (None, None)
    if state is JobState.FAILED and message is None:
        code, message = status, f"the job ended with status {status!r} and no error event"
    tags = {"together.status": status, "together.base_model": str(job.model or "")}
    for key in ("training_file", "validation_file", "suffix", "wandb_url"):
        value = getattr(job, key, None)
        if value:
            tags[f"together.{key}"] = str(value)
    if tuned_model(job):
        tags["together.output_name"] = str(tuned_model(job))
    return TuningJob(
        job_id=job.id, state=state, provider_status=status, tuned_model=tuned_model(job) if state is
        JobState.SUCCEEDED else None, error_code=code, error_message=message, tags=tags,
        metrics=job_numbers(job), base_model=job.model,
        hyperparameters=shared_hyperparameters(_hyperparameters(job), HYPERPARAMETER_NAMES),
        total_steps=getattr(job, "total_steps", None) or total_steps(events or []),
    )


def candidates(raw: Iterable[Any], final_model: str | None, n_epochs: int | None) -> list[Checkpoint]:
    """The job's servable intermediate checkpoints (those registered under a model name), oldest first; the
    final one is the tuned model itself and is left out. Epochs are placed by step like OpenAI's."""
    rows = sorted((c for c in raw if c.object_name and c.object_name != final_model), key=lambda c: c.step)
    if not rows:
        return []
    last = max(c.step for c in raw)
    return [Checkpoint(checkpoint_id=f"step-{c.step}", model=c.object_name, step=int(c.step),
                       epoch=round(c.step * n_epochs / last) if n_epochs and last else None) for c in rows]

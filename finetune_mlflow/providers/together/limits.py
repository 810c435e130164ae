"""Pure: the job's settings against the base model's `model_limits`, and the `fine_tuning.create` arguments.

Every setting is checked before anything is uploaded or launched, so a rank, batch size or learning rate the
model refuses fails with the knob's name and the allowed range instead of a 400 after the upload.
"""

from __future__ import annotations

from typing import Any

from finetune_mlflow.errors import ConfigError
from finetune_mlflow.providers.base import TuningRequest

# Together's suffix is at most 40 characters; the run token in it is what lets a rerun find the job it created.
MAX_SUFFIX = 40
RUN_TOKEN_LENGTH = 12


def run_suffix(suffix: str, run_id: str) -> str:
    """The job's suffix: the configured one plus a token of the MLflow run (Together jobs carry no metadata, so
    the suffix is how a rerun whose create response was lost finds the job instead of paying for a second)."""
    token = run_id.replace("-", "")[:RUN_TOKEN_LENGTH]
    head = "".join(c if c.isalnum() or c in "-_" else "-" for c in suffix)[: MAX_SUFFIX - len(token) - 1]
    return f"{head}-{token}" if head else token


def limit_errors(limits: Any, request: TuningRequest, settings: Any, longest_example_tokens: int,
                 has_validation: bool) -> list[str]:
    """What the model refuses, one message per setting (empty: launchable). `limits` is the SDK's
    FinetuneModelLimits; `settings` the config's together section."""
    errors: list[str] = []
    lora = limits.lora_training
    name = limits.api_model_name

    def out_of(knob: str, value: Any, low: Any, high: Any) -> None:
        if not (low <= value <= high):
            errors.append(f"{knob}={value} is outside {name}'s range {low}..{high}")

    out_of("tune.epochs", request.epochs, 1, limits.max_num_epochs)
    out_of("tune.learning_rate", request.learning_rate, limits.min_learning_rate, limits.max_learning_rate)
    if request.batch_size:
        out_of("tune.batch_size", request.batch_size, lora.min_batch_size, lora.max_batch_size)
    out_of("together.lora_r", settings.lora_r, 1, lora.max_rank)
    out_of("together.n_checkpoints", settings.n_checkpoints, 1, limits.max_num_checkpoints)
    if has_validation:
        out_of("together.n_evals", settings.n_evals, 0, limits.max_num_evals)
    modules = [m.strip() for m in settings.lora_trainable_modules.split(",") if m.strip()]
    unknown = [m for m in modules if m != "all-linear" and m not in lora.target_modules]
    if unknown or not modules:
        errors.append(f"together.lora_trainable_modules={settings.lora_trainable_modules!r}: {name} takes "
                      f"all-linear or some of {', '.join(lora.target_modules)}")
    seq = settings.max_seq_length or limits.max_seq_length_sft
    out_of("together.max_seq_length", seq, limits.min_max_seq_length, limits.max_seq_length_sft)
    if longest_example_tokens > seq:
        errors.append(f"the longest example has ~{longest_example_tokens} tokens, more than the sequence length "
                      f"{seq}; lower data.max_example_chars or raise together.max_seq_length")
    return errors


def check_limits(limits: Any, request: TuningRequest, settings: Any, longest: int, has_validation: bool) -> None:
    errors = limit_errors(limits, request, settings, longest, has_validation)
    if errors:
        raise ConfigError(f"{request.base_model} cannot be tuned with these settings (model_limits): "
                          + "; ".join(errors) + "; nothing was uploaded")


def create_kwargs(request: TuningRequest, settings: Any, training_file: str, validation_file: str | None,
                  limits: Any) -> dict[str, Any]:
    """`client.fine_tuning.create` arguments: a LoRA SFT job on the prepared files, the limits already fetched
    passed along so the SDK does not ask for them again."""
    kwargs: dict[str, Any] = dict(
        training_file=training_file, model=request.base_model, n_epochs=request.epochs,
        learning_rate=request.learning_rate, batch_size=request.batch_size or "max", lora=True,
        lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        lora_trainable_modules=settings.lora_trainable_modules, n_checkpoints=settings.n_checkpoints,
        suffix=run_suffix(request.suffix, request.run_id), random_seed=request.seed, model_limits=limits,
        train_on_inputs="auto",
    )
    if settings.max_seq_length:
        kwargs["max_seq_length"] = settings.max_seq_length
    if validation_file:
        kwargs.update(validation_file=validation_file, n_evals=settings.n_evals)
    return kwargs

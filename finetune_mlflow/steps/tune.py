"""tune: launch (or reattach to) a supervised tuning job, stream its losses, evaluate and register the result.

Parameters in: `config`, `provider`, `base_model`, `epochs`, `learning_rate`, `batch_size`,
`registered_model_name`, `poll_interval`, `max_examples`, `train_data`, `validation_data`.
Params logged: `provider`, `base_model`, `epochs`, `learning_rate`, `batch_size`, `n_train`, `n_val`,
`config_sha256`, plus the flattened config; `config.yaml` artifact.
Step metrics: `train_loss`, `val_loss` (and provider extras such as token accuracy), step = training step, written
with `log_batch` and never twice. Summary metrics: `eval_exact_match`, `eval_f1`, `latency_ms_*` and the rest of
the evaluate set for the tuned model, `base_eval_*` for the base model on the same split, `eval_f1_delta` with its
paired-bootstrap interval, preflight estimates (`estimated_billed_tokens`, `estimated_cost_usd`).
Job-level metrics as they change while polling (e.g. `completed_step_count`, dataset statistics, `trained_tokens`).
Tags: `finetune.job_id` (written as soon as the job exists: a rerun with `--run-id` reattaches instead of paying
for a second job), `finetune.job_state`, `finetune.provider_status`, `finetune.status.<status>` (UTC time each
provider status was first seen), `finetune.metrics_cursor`,
`finetune.tuned_model`, `finetune.registered_version`. The tuned model is registered as a pyfunc version of
`registered_model_name`.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config, dump_yaml
from finetune_mlflow.errors import ConfigError, TuningJobFailed, TuningTimeout
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, Provider, TuningJob, TuningRequest
from finetune_mlflow.registry import RegisteredVersion, register_tuned_model
from finetune_mlflow.steps.evaluate import base_evaluation, evaluate_and_log
from finetune_mlflow.steps.prepare import Prepared, ensure_prepared
from finetune_mlflow.tracking import MetricSink, log_values, step_run

logger = logging.getLogger(__name__)

JOB_ID_TAG = "finetune.job_id"
CURSOR_TAG = "finetune.metrics_cursor"
# Set once the tuned model's evaluation completed within its error budget.
EVALUATED_TAG = "finetune.evaluated_model"
# What MLflow raises when the tracking server is down, overloaded or timing out (connection errors included).
TRANSIENT_TRACKING_ERRORS = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})


@dataclass(frozen=True)
class TuneResult:
    run_id: str
    job: TuningJob
    metrics: dict[str, float]
    version: RegisteredVersion


def _request(config: Config, run_id: str, prepared: Prepared) -> TuningRequest:
    return TuningRequest(
        run_id=run_id, base_model=config.tune.base_model, prepared_dir=prepared.directory,
        epochs=config.tune.epochs, learning_rate=config.tune.learning_rate, batch_size=config.tune.batch_size,
        seed=config.tune.seed, suffix=config.tune.suffix,
    )


def _launch(provider: Provider, request: TuningRequest, config: Config, client: MlflowClient) -> str:
    report = provider.preflight(request)
    for warning in report.warnings:
        logger.warning("preflight: %s", warning)
    estimates = {"estimated_train_tokens": report.estimated_train_tokens,
                 "estimated_billed_tokens": report.estimated_billed_tokens}
    if report.estimated_cost_usd is not None:
        estimates["estimated_cost_usd"] = report.estimated_cost_usd
    log_values(client, request.run_id, metrics=estimates)
    limit = config.tune.max_cost_usd
    if limit and report.estimated_cost_usd is not None and report.estimated_cost_usd > limit:
        raise ConfigError(f"estimated cost ${report.estimated_cost_usd:.2f} is over tune.max_cost_usd=${limit:.2f}; "
                          "lower epochs or max_examples, or raise max_cost_usd")
    job = provider.start_job(request)
    # First write after creation: everything after this point can crash and a rerun will reattach.
    client.set_tag(request.run_id, JOB_ID_TAG, job.job_id)
    log_values(client, request.run_id, tags={"finetune.job_state": job.state.value,
                                             "finetune.provider_status": job.provider_status,
                                             f"finetune.status.{job.provider_status}": _now_iso()})
    logger.info("started %s job %s (%s)", provider.name, job.job_id, job.provider_status)
    return job.job_id


def stream_job(provider: Provider, job_id: str, run_id: str, config: Config, *,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
               wait: bool = True) -> TuningJob:
    """Poll until the job ends, logging new metric points and state transitions as they appear.

    `wait=False` (sync) polls once: whatever the job has now is logged and the job is returned in any state."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    cursor = tags.get(CURSOR_TAG)
    last_status = tags.get("finetune.provider_status")
    sink = MetricSink(client, run_id)
    progress = dict(client.get_run(run_id).data.metrics)
    deadline = clock() + config.tune.timeout_seconds
    interval = config.tune.poll_interval
    while True:
        job = provider.get_job(job_id)
        # Read metrics after the state: once the job is terminal, this read holds every point it will ever have.
        page = provider.read_metrics(job_id, cursor)
        changed = job.provider_status != last_status
        # Job-level numbers (steps completed, dataset stats) as they move, so the UI shows progress.
        moved = {k: v for k, v in job.metrics.items() if progress.get(k) != float(v)}
        try:
            logged = sink.log(page.points)
            if page.next_cursor != cursor or changed or moved:
                transition = {f"finetune.status.{job.provider_status}": _now_iso()} if changed else {}
                log_values(client, run_id, metrics=moved, tags={
                    CURSOR_TAG: page.next_cursor or "", "finetune.job_state": job.state.value,
                    "finetune.provider_status": job.provider_status, **transition})
        except MlflowException as e:
            # The tracking server stayed unreachable through MLflow's own retries: keep the cursor where it was
            # and read the same points again next poll, so nothing is lost and nothing is logged twice.
            if e.error_code not in TRANSIENT_TRACKING_ERRORS or clock() > deadline:
                raise
            logger.warning("tracking server write failed (%s); retrying on the next poll", e)
            sleep(config.tune.poll_interval)
            continue
        cursor = page.next_cursor
        progress.update({k: float(v) for k, v in moved.items()})
        if changed:
            last_status = job.provider_status
            logger.info("job %s is %s", job_id, job.provider_status)
        if job.state in TERMINAL_STATES or not wait:
            return job
        if clock() > deadline:
            raise TuningTimeout(f"job {job_id} still {job.provider_status} after {config.tune.timeout_seconds:.0f}s; "
                                f"it keeps running: rerun with --run-id {run_id} to reattach")
        interval = config.tune.poll_interval if (logged or changed) else min(interval * 1.5,
                                                                               config.tune.poll_interval * 8)
        sleep(interval)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finish_failed(client: MlflowClient, run_id: str, job: TuningJob) -> None:
    log_values(client, run_id, tags={"finetune.error_code": job.error_code or "",
                                     "finetune.error_message": (job.error_message or "")[:5000]})
    raise TuningJobFailed(job.job_id, job.state.value, job.error_code, job.error_message)


def _changed_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> dict[str, float]:
    """Job-level numbers not already on the run with that value (a rerun or re-sync adds no history entries, and
    `full_valid_loss`, already a step metric, is not written again at step 0)."""
    latest = client.get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if latest.get(k) != float(v)}


def finish_job(provider: Provider, job: TuningJob, run_id: str, config: Config, prepared: Prepared,
               ) -> tuple[dict[str, float], RegisteredVersion]:
    """The post-job part shared by tune and sync, in the active run `run_id`: record a failure (tags, then raise
    TuningJobFailed), or log the job's facts, evaluate the tuned model against the base model on the prepared
    validation split, and register it (once per run). `config.tune.base_model` is the job's base model."""
    client = MlflowClient()
    provider_name = provider.name
    if job.state is not JobState.SUCCEEDED:
        _finish_failed(client, run_id, job)
    log_values(client, run_id, metrics=_changed_metrics(client, run_id, job.metrics),
               tags={**job.tags, "finetune.tuned_model": job.tuned_model or "",
                     "finetune.data_sha256": prepared.data_sha256, "finetune.prepare_run_id": prepared.run_id})

    base = base_evaluation(config, prepared, provider)
    run = client.get_run(run_id)
    if run.data.tags.get(EVALUATED_TAG) == job.tuned_model:
        # A rerun after a crash past evaluation: the run already holds this model's complete evaluation.
        logger.info("run %s already evaluated %s; not paying for it again", run_id, job.tuned_model)
        metrics = dict(run.data.metrics)
    else:
        tuned = evaluate_and_log(provider, job.tuned_model, prepared.split("validation"), config, base.rows)
        base_metrics = {f"base_{k}": v for k, v in base.metrics.items()
                        if k.startswith(("eval_", "latency_ms_"))}
        log_values(client, run_id, metrics=base_metrics,
                   tags={"finetune.base_eval_run_id": base.run_id, EVALUATED_TAG: job.tuned_model})
        metrics = {**tuned.metrics, **base_metrics}

    version = register_tuned_model(
        run_id=run_id, config=config, provider=provider_name, model_id=job.tuned_model,
        tags={**job.tags, "provider": provider_name, "base_model": config.tune.base_model, "job_id": job.job_id,
              "tuned_model": job.tuned_model, "source_run": run_id, "data_sha256": prepared.data_sha256,
              "eval_f1": f"{metrics['eval_f1']:.4f}", "eval_exact_match": f"{metrics['eval_exact_match']:.4f}",
              "latency_ms_p95": f"{metrics.get('latency_ms_p95', float('nan')):.3f}"},
        description=(f"{provider_name} tuning job {job.job_id} of {config.tune.base_model}: validation F1 "
                     f"{metrics['eval_f1']:.2f}, EM {metrics['eval_exact_match']:.2f} (base F1 "
                     f"{base.metrics.get('eval_f1', float('nan')):.2f}); source run {run_id}"),
    )
    client.set_tag(run_id, "finetune.registered_version", f"{version.name}/{version.version}")
    logger.info("tuned %s: F1 %.2f (base %.2f), registered %s", job.tuned_model, metrics["eval_f1"],
                base.metrics.get("eval_f1", float("nan")), version.model_uri)
    return metrics, version


def run_tune(config: Config, *, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> TuneResult:
    provider_name = config.tune.provider
    with step_run("tune", run_name=f"tune-{provider_name}",
                  tags={"finetune.provider": provider_name, "finetune.base_model": config.tune.base_model}) as run:
        run_id = run.info.run_id
        client = MlflowClient()
        provider = get_provider(provider_name, config)
        prepared = ensure_prepared(config)
        n_train, n_val = len(prepared.split("train")), len(prepared.split("validation"))
        params = {"provider": provider_name, "base_model": config.tune.base_model, "epochs": config.tune.epochs,
                  "learning_rate": config.tune.learning_rate, "batch_size": config.tune.batch_size,
                  "n_train": n_train, "n_val": n_val, "config_sha256": config.sha256(), **config.flat_params()}
        log_values(client, run_id, params=params, tags={"finetune.data_sha256": prepared.data_sha256,
                                                       "finetune.prepare_run_id": prepared.run_id})
        mlflow.log_text(dump_yaml(config), "config.yaml")

        job_id = client.get_run(run_id).data.tags.get(JOB_ID_TAG)
        if job_id:
            logger.info("run %s already has job %s: reattaching instead of launching another", run_id, job_id)
        else:
            job_id = _launch(provider, _request(config, run_id, prepared), config, client)
        job = stream_job(provider, job_id, run_id, config, sleep=sleep, clock=clock)
        metrics, version = finish_job(provider, job, run_id, config, prepared)
        return TuneResult(run_id, job, metrics, version)

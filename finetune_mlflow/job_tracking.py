"""A tuning job as seen from its MLflow run: launch it (job id on the run at once), stream its curves and state
into the run until it ends, then evaluate and register the tuned model. Shared by `tune` and `sync`.

Tags: `finetune.job_id` (written as soon as the job exists: a rerun with `--run-id` reattaches instead of paying
for a second job), `finetune.job_state`, `finetune.provider_status`, `finetune.status.<status>` (UTC time each
provider status was first seen), `finetune.metrics_cursor`, `finetune.tuned_model`, `finetune.registered_version`,
and the registered model's lifecycle (`finetune.shutdown_date`, `finetune.lifecycle_stage`,
`finetune.lifecycle_checked_at`, ...; see `lifecycle_record`), also on the registered version. A launch is refused
before any upload when the provider or a dated entry says the base model takes no new jobs.
Step metrics (`train_loss`, `val_loss`, ...) are written with `log_batch` and never twice.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow import checkpoints
from finetune_mlflow.config import Config
from finetune_mlflow.costing import check_cost_limit
from finetune_mlflow.errors import FinetuneError, TuningJobFailed, TuningTimeout
from finetune_mlflow.lifecycle_record import check_accepts_jobs, lifecycle_tags
from finetune_mlflow.providers.base import (
    TERMINAL_STATES,
    Checkpoint,
    JobState,
    MetricPoint,
    MetricsPage,
    Provider,
    TuningJob,
    TuningRequest,
)
from finetune_mlflow.registry import MODEL_NAME_IN_RUN, RegisteredVersion, register_tuned_model
from finetune_mlflow.preparation import Prepared
from finetune_mlflow.progress import Progress
from finetune_mlflow.redaction import redact
from finetune_mlflow.store_outage import MAX_BACKOFF_S, MAX_OUTAGE_S, Outage, permanent
from finetune_mlflow.run_cost import check_eval_cost, run_cost, usage_of
from finetune_mlflow.scoring import Evaluation, evaluate_and_log, load_rows
from finetune_mlflow.summary import base_scores, describe_tune
from finetune_mlflow.tracking import MetricSink, log_values, quiet_store_log

logger = logging.getLogger(__name__)

JOB_ID_TAG = "finetune.job_id"
CURSOR_TAG = "finetune.metrics_cursor"
CURVES_TAG = "finetune.curves"
# Set once the tuned model's evaluation completed within its error budget.
EVALUATED_TAG = "finetune.evaluated_model"
LOGGED_MODEL_TAG = "finetune.logged_model_id"
# What MLflow raises when the tracking server is down, overloaded or timing out (connection errors included).
TRANSIENT_TRACKING_ERRORS = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})


class TrackingStoreDown(FinetuneError):
    """The tracking store took no write for too long, or refuses writes for good; the job keeps running."""


def request_for(config: Config, run_id: str, prepared: Prepared) -> TuningRequest:
    return TuningRequest(
        run_id=run_id, base_model=config.tune.base_model, prepared_dir=prepared.directory,
        epochs=config.tune.epochs, learning_rate=config.tune.learning_rate, batch_size=config.tune.batch_size,
        seed=config.tune.seed, suffix=config.tune.suffix,
    )


def launch(provider: Provider, request: TuningRequest, config: Config, client: MlflowClient) -> str:
    report = provider.preflight(request)
    for warning in report.warnings:
        logger.warning("preflight: %s", warning)
    if report.estimated_cost_usd:  # billing estimates mean nothing for a provider that bills nothing
        log_values(client, request.run_id, metrics={
            "estimated_train_tokens": report.estimated_train_tokens,
            "estimated_billed_tokens": report.estimated_billed_tokens,
            "estimated_cost_usd": round(report.estimated_cost_usd, 4)})
    check_cost_limit(report.estimated_cost_usd, config.tune.max_cost_usd, price_key=f"{provider.name}."
                     "training_price_per_million_tokens", what=f"tuning {request.base_model} for {request.epochs} epochs",
                     unpriced=request.base_model)
    check_accepts_jobs(provider, request.base_model, config)  # before any upload
    job = provider.start_job(request)
    # First write after creation: everything after this point can crash and a rerun will reattach.
    client.set_tag(request.run_id, JOB_ID_TAG, job.job_id)
    log_values(client, request.run_id, tags={"finetune.job_state": job.state.value,
                                             "finetune.provider_status": job.provider_status,
                                             f"finetune.status.{job.provider_status}": _now_iso()})
    logger.info("started %s job %s (%s)", provider.name, job.job_id, job.provider_status)
    return job.job_id


@dataclass
class _RunState:
    """What the run already holds of the job: the provider cursor, the last status, the job-level numbers."""

    cursor: str | None
    status: str | None
    numbers: dict[str, float]


def _record_poll(client: MlflowClient, sink: MetricSink, run_id: str, state: _RunState, job: TuningJob,
                 page: MetricsPage) -> tuple[int, bool]:
    """Log one poll's news (new points, moved job-level numbers, a status transition, the new cursor); returns
    (points logged, status changed). Raises MlflowException with the run state untouched if the store fails."""
    changed = job.provider_status != state.status
    # Job-level numbers (steps completed, dataset stats) as they move, so the UI shows progress.
    moved = {k: float(v) for k, v in job.metrics.items() if state.numbers.get(k) != float(v)}
    logged = sink.log(page.points)
    if page.next_cursor != state.cursor or changed or moved:
        transition = {f"finetune.status.{job.provider_status}": _now_iso()} if changed else {}
        log_values(client, run_id, metrics=moved, tags={
            CURSOR_TAG: page.next_cursor or "", "finetune.job_state": job.state.value,
            "finetune.provider_status": job.provider_status, **transition})
    state.cursor, state.status = page.next_cursor, job.provider_status
    state.numbers.update(moved)
    return logged, changed


def stream_job(provider: Provider, job_id: str, run_id: str, config: Config, *,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
               wait: bool = True, on_points: Callable[[TuningJob, list[MetricPoint]], None] | None = None
               ) -> TuningJob:
    """Poll until the job ends, logging new metric points and state transitions as they appear.

    `wait=False` (sync) polls once: whatever the job has now is logged and the job is returned in any state.
    `on_points` sees each poll's new points once they are on the run (a search's pruner); it may raise to stop."""
    job_id = provider.check_job_id(job_id)  # from a run tag or the user: never a path or a URL
    client = MlflowClient()
    run = client.get_run(run_id)
    state = _RunState(run.data.tags.get(CURSOR_TAG), run.data.tags.get("finetune.provider_status"),
                      dict(run.data.metrics))
    sink = MetricSink(client, run_id)
    deadline = clock() + config.tune.timeout_seconds
    watch = Progress(started=clock())
    interval = config.tune.poll_interval
    outage = Outage(config.tune.poll_interval)
    while True:
        job = provider.get_job(job_id)
        # Read metrics after the state: once the job is terminal, this read holds every point it will ever have.
        page = provider.read_metrics(job_id, state.cursor)
        try:
            with quiet_store_log():  # MLflow's SQL store logs a page of traceback per failed statement
                logged, changed = _record_poll(client, sink, run_id, state, job, page)
        except MlflowException as e:
            # The store stayed unreachable through MLflow's own retries: keep the cursor where it was and read the
            # same points again later, so nothing is lost and nothing is logged twice; back off, say it once.
            reason = (str(e).strip().splitlines() or [e.error_code])[0][:300]
            if e.error_code not in TRANSIENT_TRACKING_ERRORS or permanent(str(e)):
                raise TrackingStoreDown(f"the tracking store refuses writes ({reason}); job {job_id} keeps "
                                        f"running: fix the store, then rerun with --run-id {run_id}") from e
            first, pause = outage.failed(clock())
            if outage.too_long(clock()) or clock() > deadline:
                raise TrackingStoreDown(f"the tracking store took no write for {clock() - outage.started:.0f} s "
                                        f"({outage.failures} tries; last: {reason}); job {job_id} keeps running: "
                                        f"rerun with --run-id {run_id} once the store is back") from e
            if first:
                logger.warning("tracking store write failed (%s); retrying with backoff up to %.0f s, for at most "
                               "%.0f min", reason, MAX_BACKOFF_S, MAX_OUTAGE_S / 60)
            sleep(pause)
            continue
        ended = outage.recovered(clock())
        if ended:
            logger.warning("tracking store writes succeed again after %d failed tries over %.0f s", *ended)
        if changed or page.points:
            watch.update(page.points, clock())
            logger.info("job %s: %s", job_id, watch.line(job, clock()))
        if on_points is not None and page.points:  # a job that ended before this poll still reports its points
            on_points(job, page.points)
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
                                     "finetune.error_message": redact(job.error_message or "")[:5000]})
    raise TuningJobFailed(job.job_id, job.state.value, job.error_code, job.error_message)


def _say_if_no_curves(provider: Provider, client: MlflowClient, run_id: str, job: TuningJob) -> None:
    """A job that succeeded without a single train_loss point: say so loudly, with where the curves were sought."""
    if client.get_metric_history(run_id, "train_loss"):
        return
    sources = getattr(provider, "curve_sources", lambda _: [])(job.job_id)
    tried = "; ".join(sources) or "the provider's event stream"
    logger.warning("job %s succeeded but no training curve was found (tried: %s); the run has no train_loss",
                   job.job_id, tried)
    log_values(client, run_id, tags={CURVES_TAG: "none found", "finetune.curves_tried": tried[:5000]})


def _changed_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> dict[str, float]:
    """Job-level numbers not already on the run with that value (a rerun or re-sync adds no history entries, and
    `full_valid_loss`, already a step metric, is not written again at step 0)."""
    latest = client.get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if latest.get(k) != float(v)}


def _logged_model(client: MlflowClient, run_id: str, job: TuningJob) -> str:
    """The run's MLflow 3 LoggedModel for the final tuned model, created (PENDING) before its evaluation so the
    scores are linked to it and show on the model's page; a rerun reuses the one it recorded."""
    existing = client.get_run(run_id).data.tags.get(LOGGED_MODEL_TAG)
    if existing:
        return existing
    model = mlflow.initialize_logged_model(name=MODEL_NAME_IN_RUN, source_run_id=run_id,
                                           params=job.hyperparameters or None)
    client.set_tag(run_id, LOGGED_MODEL_TAG, model.model_id)
    return model.model_id


def _set_aside(model_id: str, checkpoint_id: str) -> None:
    """The final model's LoggedModel when a checkpoint is registered instead: it keeps its linked scores and ends
    FAILED with the reason, so nothing is left PENDING."""
    client = MlflowClient()
    if client.get_logged_model(model_id).status == LoggedModelStatus.PENDING:
        client.set_logged_model_tags(model_id, {"finetune.end_reason": f"checkpoint {checkpoint_id} was registered "
                                                "instead of the final model"})
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)


def _evaluate_final(provider: Provider, job: TuningJob, run_id: str, config: Config, examples: list[dict],
                    base: Evaluation, candidates: list[Checkpoint]) -> tuple[dict[str, float], list]:
    """The final model's metrics and rows: evaluated against `base` (after one cost guard over it and every
    checkpoint to come), or read back when an earlier attempt of this run already evaluated it.

    The base model's scores stay on the base evaluation run (`finetune.base_eval_run_id`); this run logs only
    what is its own, the delta included, so the chart view compares what differs between tune runs. The returned
    metrics add them as `base_*` for the descriptions written from them."""
    client = MlflowClient()
    run = client.get_run(run_id)
    done = run.data.tags.get(EVALUATED_TAG) == job.tuned_model
    check_eval_cost(examples, ([] if done else [job.tuned_model]) + [c.model for c in candidates], config,
                    provider.name)
    base_metrics = base_scores(base.metrics)
    if done:
        # A rerun after a crash past evaluation: the run already holds this model's complete evaluation.
        logger.info("run %s already evaluated %s; not paying for it again", run_id, job.tuned_model)
        return {**run.data.metrics, **base_metrics}, (load_rows(run_id) if candidates else [])
    tuned = evaluate_and_log(provider, job.tuned_model, examples, config, base.rows,
                             linked_model_id=_logged_model(client, run_id, job))
    log_values(client, run_id, tags={"finetune.base_eval_run_id": base.run_id, EVALUATED_TAG: job.tuned_model})
    return {**tuned.metrics, **base_metrics}, tuned.rows


def _select_model(provider: Provider, job: TuningJob, run_id: str, config: Config, examples: list[dict],
                  base: Evaluation, final: tuple[dict[str, float], list], candidates: list[Checkpoint]
                  ) -> checkpoints.Selection:
    """Evaluate the checkpoints, pick the model to register, and record the choice with the run's real cost."""
    previous = checkpoints.previous_selection(MlflowClient(), run_id)
    if previous is not None:
        return previous
    metrics, rows = final
    evaluated = checkpoints.evaluate(provider, candidates, examples, config, rows, job.tuned_model)
    chosen = checkpoints.choose(evaluated)
    checkpoints.log_candidates(run_id, job, metrics, evaluated, chosen)
    selection = checkpoints.selection_of(job.tuned_model, metrics, chosen, base.rows, config)
    usages = [usage_of(job.tuned_model, metrics)] + [usage_of(c.checkpoint.model, c.metrics) for c in evaluated]
    cost = run_cost(provider.name, job.metrics, config, usages, MlflowClient().get_run(run_id).data.metrics)
    checkpoints.record(run_id, selection, cost)
    return selection


def finish_job(provider: Provider, job: TuningJob, run_id: str, config: Config, prepared: Prepared,
               base: Evaluation | None) -> tuple[dict[str, float], RegisteredVersion]:
    """The post-job part shared by tune and sync, in the active run `run_id`: record a failure (tags, then raise
    TuningJobFailed), or log the job's facts, evaluate the tuned model and its checkpoints against `base` (the
    base model on the same prepared validation split), and register the model the evidence picks (once per run).
    `config.tune.base_model` is the job's base model."""
    client = MlflowClient()
    if job.state is not JobState.SUCCEEDED or base is None:
        _finish_failed(client, run_id, job)
    _say_if_no_curves(provider, client, run_id, job)
    if base is None:
        raise ValueError("a succeeded job is evaluated against the base model: pass its evaluation")
    log_values(client, run_id, metrics=_changed_metrics(client, run_id, job.metrics),
               tags={**job.tags, "finetune.tuned_model": job.tuned_model or "",
                     "finetune.data_sha256": prepared.data_sha256, "finetune.prepare_run_id": prepared.run_id})
    examples = prepared.split("validation")
    candidates = checkpoints.plan(provider, job, run_id, config)
    final = _evaluate_final(provider, job, run_id, config, examples, base, candidates)
    selection = _select_model(provider, job, run_id, config, examples, base, final, candidates)
    metrics = {**final[0], **{f"selected_{k}": v for k, v in selection.metrics.items()}}
    lifecycle = lifecycle_tags(provider, selection.model, config.tune.base_model, config)
    log_values(client, run_id, tags=lifecycle)
    version = _register(provider, job, run_id, config, prepared, base, selection, lifecycle)
    # A sweep child logs its model but registers no version (its sweep registers the winner only).
    registered = {"finetune.registered_version": f"{version.name}/{version.version}"} if version.version else {}
    log_values(client, run_id, tags={**registered, "mlflow.note.content": describe_tune(metrics, job.job_id)
                                     + checkpoints.describe(selection)})
    logger.info("tuned %s: F1 %.2f (base %.2f), registered %s (%s)", job.tuned_model, metrics["eval_f1"],
                base.metrics.get("eval_f1", float("nan")), version.model_uri, selection.model)
    return metrics, version


def _register(provider: Provider, job: TuningJob, run_id: str, config: Config, prepared: Prepared,
              base: Evaluation, selection: checkpoints.Selection, lifecycle: dict[str, str]) -> RegisteredVersion:
    chosen, name = selection.metrics, provider.name
    what = (f"checkpoint {selection.checkpoint.checkpoint_id} (step {selection.checkpoint.step}) of "
            if selection.checkpoint else "")
    # The final model's LoggedModel carries its linked scores; a winning checkpoint gets a LoggedModel of its own.
    logged = MlflowClient().get_run(run_id).data.tags.get(LOGGED_MODEL_TAG)
    if selection.checkpoint and logged:
        _set_aside(logged, selection.checkpoint.checkpoint_id)
        logged = None
    return register_tuned_model(
        run_id=run_id, config=config, provider=name, model_id=selection.model, logged_model_id=logged,
        artifacts=provider.model_artifacts(selection.model), packages=provider.serving_packages,
        tags={**job.tags, "provider": name, "base_model": config.tune.base_model, "job_id": job.job_id,
              "tuned_model": selection.model, "source_run": run_id, "data_sha256": prepared.data_sha256,
              # Read on the version page: rounded as a person reads them (the run keeps full precision).
              "eval_f1": f"{chosen['eval_f1']:.2f}", "eval_exact_match": f"{chosen['eval_exact_match']:.2f}",
              "latency_ms_p95": f"{chosen.get('latency_ms_p95', float('nan')):.2f}",
              **checkpoints.selection_tags(selection), **lifecycle},
        description=(f"{what}{name} tuning job {job.job_id} of {config.tune.base_model}: validation F1 "
                     f"{chosen['eval_f1']:.2f}, EM {chosen['eval_exact_match']:.2f} (base F1 "
                     f"{base.metrics.get('eval_f1', float('nan')):.2f}); source run {run_id}"),
    )

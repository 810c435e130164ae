"""sync: import tuning jobs that already exist at the provider (or refresh their runs), evaluate and register them.

Parameters in: `config`, `provider`, `job_id` (a job id such as `ftjob-...`, a Vertex job name
`projects/P/locations/L/tuningJobs/N`, or `all` for every job the credentials can list, following pagination),
`registered_model_name`, `train_data`, `validation_data`, `max_examples` (the data the tuned models are evaluated on).

The entry point's run is a parent `sync` run (tags `finetune.step=sync`, `finetune.sync_job_ids`, counts as
metrics `sync_n_jobs`, `sync_n_succeeded`, `sync_n_failed`, `sync_n_unfinished`). Each job gets one child run: the
run whose `finetune.job_id` tag equals the job id (found with a tag search in the current experiment; a `tune` run
of that job counts) is updated in place, else a new run is created. A job run holds the same things a `tune` run
does: params `provider`, `base_model`, `job_id` and the job's hyperparameters under the knob names tune uses
(`epochs`, `learning_rate`, `batch_size`, `adapter_size`; params already on the run are left as they are), the full step-metric history (read from the stored `finetune.metrics_cursor`
on, never a step twice), the job's tags (files, checkpoints, status), a `job.json` artifact, and for a succeeded
job the evaluation against the base model and a registered version tagged with the tuned model (done once: a
run that is already registered for the same tuned model is not evaluated again).

A failed or cancelled job's run ends FAILED with `finetune.error_code`/`finetune.error_message`; sync itself goes
on with the other jobs. A job still running is recorded as it is now (its run ends FINISHED with
`finetune.job_state` pending/running and nothing registered): sync again later, or reattach with
`mlflow run . -e tune --run-id <that run>`, which streams it to the end. A job whose run a live process owns (a
`tune` still watching it; see `ownership`) is left to that process, untouched, and reported as not synced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow import ownership
from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError, FinetuneError, TuningJobFailed
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, Provider, TuningJob
from finetune_mlflow.job_tracking import JOB_ID_TAG, finish_job, stream_job
from finetune_mlflow.preparation import Prepared, ensure_prepared
from finetune_mlflow.scoring import base_evaluation
from finetune_mlflow.tracking import MetricSink, log_json, log_values, quote, step_run

logger = logging.getLogger(__name__)

ALL_JOBS = "all"


@dataclass(frozen=True)
class SyncedJob:
    job_id: str
    run_id: str
    state: JobState
    created_run: bool
    registered_version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class SyncResult:
    run_id: str
    jobs: list[SyncedJob]


def find_job_run(experiment_id: str, job_id: str) -> str | None:
    """The newest run of the experiment tagged with this job id (a tune run or an earlier sync), else None."""
    runs = MlflowClient().search_runs([experiment_id], f"tags.`{JOB_ID_TAG}` = {quote(job_id)}",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _short(job_id: str) -> str:
    return job_id.rsplit("/", 1)[-1]


@contextlib.contextmanager
def _job_run(existing_run_id: str | None, job_id: str, provider: str) -> Iterator[mlflow.ActiveRun]:
    """A nested run for the job: the existing one resumed as it is (its step tag untouched), or a new sync run.
    Ends FAILED on any exception, FINISHED otherwise."""
    if existing_run_id is None:
        with step_run("sync", run_name=f"sync-{provider}-{_short(job_id)}",
                      tags={JOB_ID_TAG: job_id, "finetune.provider": provider}) as run:
            yield run
        return
    # A run a live process owns (a `tune` still watching its job) is not taken over: RunHeld, nothing touched.
    ownership.claim(existing_run_id)
    with mlflow.start_run(run_id=existing_run_id, nested=True) as run:
        ownership.mark_owner(existing_run_id)
        yield run


def _already_registered(run_id: str, job: TuningJob) -> str | None:
    tags = MlflowClient().get_run(run_id).data.tags
    if job.tuned_model and tags.get("finetune.tuned_model") == job.tuned_model:
        return tags.get("finetune.registered_version") or None
    return None


def _extra_history(provider: Provider, job: TuningJob) -> list:
    """Step metrics a provider keeps outside its event stream (OpenAI's result file), to fill steps the events
    no longer list; MetricSink skips every step the run already has."""
    if job.state is not JobState.SUCCEEDED:
        return []
    try:
        return list(provider.result_file_metrics(job.job_id))
    except Exception as e:  # noqa: BLE001 - a missing result file only means no extra history
        logger.warning("could not read the result file of %s (%s); keeping the event history only", job.job_id, e)
        return []


def sync_job(provider: Provider, job_id: str, config: Config, prepared: Prepared, experiment_id: str) -> SyncedJob:
    """Create or update the run of one job; see the module docstring."""
    client = MlflowClient()
    existing = find_job_run(experiment_id, job_id)
    logger.info("syncing %s job %s into %s", provider.name, job_id,
                f"existing run {existing}" if existing else "a new run")
    run_id = existing or ""
    try:
        with _job_run(existing, job_id, provider.name) as run:
            run_id = run.info.run_id
            job = stream_job(provider, job_id, run_id, config, wait=False)
            if job.state in TERMINAL_STATES:
                MetricSink(client, run_id).log(_extra_history(provider, job))
            base_model = job.base_model or config.tune.base_model
            job_config = dataclasses.replace(config, tune=dataclasses.replace(config.tune, base_model=base_model))
            present = client.get_run(run_id).data.params
            params = {"provider": provider.name, "base_model": base_model, "job_id": job_id, **job.hyperparameters}
            log_values(client, run_id, params={k: v for k, v in params.items() if k not in present},
                       tags={"finetune.provider": provider.name, "finetune.base_model": base_model,
                             "finetune.job_state": job.state.value,
                             "finetune.provider_status": job.provider_status, **job.tags})
            log_json(dataclasses.asdict(job), "job.json")
            if job.state not in TERMINAL_STATES:
                logger.warning("job %s is still %s: recorded as it is now; sync again later or reattach with "
                               "`mlflow run . -e tune --run-id %s`", job_id, job.provider_status, run_id)
                return SyncedJob(job_id, run_id, job.state, existing is None)
            registered = _already_registered(run_id, job) if job.state is JobState.SUCCEEDED else None
            if registered:
                logger.info("run %s already evaluated and registered %s as %s", run_id, job.tuned_model, registered)
                return SyncedJob(job_id, run_id, job.state, existing is None, registered)
            base = base_evaluation(job_config, prepared, provider) if job.state is JobState.SUCCEEDED else None
            _, version = finish_job(provider, job, run_id, job_config, prepared, base)
            return SyncedJob(job_id, run_id, job.state, existing is None, f"{version.name}/{version.version}")
    except TuningJobFailed as e:
        logger.warning("job %s: %s", job_id, e)
        return SyncedJob(job_id, run_id, JobState(e.state), existing is None, error=str(e))
    except ownership.RunHeld as e:
        logger.warning("job %s left to the process that owns its run: %s", job_id, e)
        state = client.get_run(run_id).data.tags.get("finetune.job_state", JobState.RUNNING.value)
        return SyncedJob(job_id, run_id, JobState(state), False, error=f"not synced: {e}")
    except FinetuneError as e:
        # One unreadable job (a 404, an evaluation over its error budget) must not stop `job_id=all`.
        logger.error("job %s could not be synced: %s", job_id, e)
        return SyncedJob(job_id, run_id, JobState.FAILED, existing is None, error=str(e))


def _listed_job_ids(provider: Provider) -> list[str]:
    """Every job the provider lists whose id has its provider's shape (anything else is skipped, said so)."""
    valid = []
    for job_id in dict.fromkeys(provider.list_jobs()):
        try:
            valid.append(provider.check_job_id(job_id))
        except ConfigError as e:
            logger.warning("skipping %s", e)
    return valid


def run_sync(config: Config, job_id: str) -> SyncResult:
    job_id = job_id.strip()
    if not job_id:
        raise ConfigError("sync needs a job: pass -P job_id=<id> (ftjob-..., projects/.../tuningJobs/...) or "
                          "-P job_id=all for every job the credentials can list")
    provider_name = config.tune.provider
    with step_run("sync", run_name=f"sync-{provider_name}",
                  tags={"finetune.provider": provider_name, "finetune.sync_request": job_id}) as run:
        provider = get_provider(provider_name, config)
        job_ids = _listed_job_ids(provider) if job_id == ALL_JOBS else [provider.check_job_id(job_id)]
        logger.info("syncing %d %s job(s)", len(job_ids), provider_name)
        mlflow.set_tag("finetune.sync_job_ids", ",".join(job_ids)[:5000])
        prepared = ensure_prepared(config)
        synced = [sync_job(provider, one, config, prepared, run.info.experiment_id) for one in job_ids]
        counts = {
            "sync_n_jobs": len(synced),
            "sync_n_succeeded": sum(1 for s in synced if s.state is JobState.SUCCEEDED),
            "sync_n_failed": sum(1 for s in synced if s.state in (JobState.FAILED, JobState.CANCELLED)),
            "sync_n_unfinished": sum(1 for s in synced if s.state not in TERMINAL_STATES),
            "sync_n_new_runs": sum(1 for s in synced if s.created_run),
        }
        log_values(MlflowClient(), run.info.run_id, metrics=counts)
        log_json([dataclasses.asdict(s) for s in synced], "synced_jobs.json")
        return SyncResult(run.info.run_id, synced)

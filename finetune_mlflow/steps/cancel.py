"""cancel: stop a tuning job, named by its job id or by the run that launched it (`-P run_id=...`).

Local jobs: SIGTERM to the trainer's process group, status `cancelled`. OpenAI and Vertex: the provider's own cancel
call (`fine_tuning.jobs.cancel`, `tunings.cancel`). The run that watches the job, if given, gets the new
`finetune.job_state`; a later `--run-id` rerun of it sees the cancelled job and ends FAILED with that reason.
Opens no run of its own (an `mlflow run -e cancel` run only records the request).
"""

from __future__ import annotations

import logging

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.job_tracking import JOB_ID_TAG
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TuningJob
from finetune_mlflow.tracking import log_values

logger = logging.getLogger(__name__)


def _job_of_run(run_id: str) -> tuple[str, str]:
    """(provider, job id) a run recorded; ConfigError when the run does not exist or launched no job."""
    try:
        tags = MlflowClient().get_run(run_id).data.tags
    except MlflowException as e:
        raise ConfigError(f"run_id {run_id!r}: no such run ({e.error_code})") from None
    if not tags.get(JOB_ID_TAG):
        raise ConfigError(f"run {run_id} has no {JOB_ID_TAG} tag: it launched no tuning job, nothing to cancel")
    return tags.get("finetune.provider", ""), tags[JOB_ID_TAG]


def run_cancel(config: Config, *, run_id: str = "", job_id: str = "") -> TuningJob:
    run_id, job_id = run_id.strip(), job_id.strip()
    if bool(run_id) == bool(job_id):
        raise ConfigError("cancel needs exactly one of -P run_id=<run that launched the job> or -P job_id=<id>")
    provider_name = config.tune.provider
    if run_id:
        provider_name, job_id = _job_of_run(run_id)
        provider_name = provider_name or config.tune.provider
    provider = get_provider(provider_name, config)
    job = provider.cancel_job(provider.check_job_id(job_id))
    if run_id:
        log_values(MlflowClient(), run_id, tags={"finetune.job_state": job.state.value,
                                                 "finetune.provider_status": job.provider_status,
                                                 "finetune.cancel_requested": "true"})
    logger.info("%s job %s: %s", provider.name, job.job_id, job.provider_status)
    return job

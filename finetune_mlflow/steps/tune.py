"""tune: launch (or reattach to) a supervised tuning job, stream its losses, evaluate and register the result.

Parameters in: `config` and the tune/data/evaluate overrides (`finetune-mlflow tune --help` lists them).
Params logged: `provider`, `base_model`, `epochs`, `learning_rate`, `batch_size`,
`config_file`, `data_sha256`, and the active provider's section as `<provider>.<key>`;
`config.yaml` artifact; metrics `n_train`, `n_val`; tag `finetune.config_sha256`. Step metrics `train_loss`, `val_loss` (and provider extras such as token accuracy), step =
training step. Summary metrics: the evaluate set for the tuned model, `base_eval_*` for the base model on the same
split, `eval_f1_delta` with its paired-bootstrap interval, preflight estimates. Tags: see `job_tracking`.
The tuned model is registered as a pyfunc version of `registered_model_name` (unless a version already serves the
same model; a sweep child only logs it, and its sweep registers the winner).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config, dump_yaml
from finetune_mlflow.job_tracking import JOB_ID_TAG, finish_job, launch, request_for, stream_job
from finetune_mlflow.preparation import Prepared, ensure_prepared
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import JobState, TuningJob
from finetune_mlflow.registry import RegisteredVersion, warm_up
from finetune_mlflow.scoring import Evaluation, base_evaluation
from finetune_mlflow.tracking import log_values, step_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneResult:
    run_id: str
    job: TuningJob
    metrics: dict[str, float]
    version: RegisteredVersion


def run_tune(config: Config, *, prepared: Prepared | None = None, base: Evaluation | None = None,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """The `tune` entry point. `prepared` and `base` are what an orchestrator (main, sweep) already produced;
    without them this run prepares (or reuses a prepare run) and evaluates the base model itself."""
    with step_run("tune", run_name=config.run_name("tune"), tags={
            "finetune.provider": config.tune.provider, "finetune.base_model": config.tune.base_model}) as run:
        run_id = run.info.run_id
        client = MlflowClient()
        provider = get_provider(config.tune.provider, config)
        prepared = prepared or ensure_prepared(config)
        n_train, n_val = len(prepared.split("train")), len(prepared.split("validation"))
        log_values(client, run_id, params={**config.run_params(), "data_sha256": prepared.data_sha256[:16]},
                   metrics={"n_train": n_train, "n_val": n_val},
                   tags={"finetune.data_sha256": prepared.data_sha256, "finetune.prepare_run_id": prepared.run_id,
                         "finetune.config_sha256": config.sha256()})
        mlflow.log_text(dump_yaml(config), "config.yaml")
        job_id = client.get_run(run_id).data.tags.get(JOB_ID_TAG)
        if job_id:
            logger.info("run %s already has job %s: reattaching instead of launching another", run_id, job_id)
        else:
            job_id = launch(provider, request_for(config, run_id, prepared), config, client)
        warm_up(provider.serving_packages)  # while the job trains
        job = stream_job(provider, job_id, run_id, config, sleep=sleep, clock=clock)
        if job.state is JobState.SUCCEEDED:  # a failed job is recorded without paying for a base evaluation
            base = base or base_evaluation(config, prepared, provider)
        metrics, version = finish_job(provider, job, run_id, config, prepared, base)
        return TuneResult(run_id, job, metrics, version)

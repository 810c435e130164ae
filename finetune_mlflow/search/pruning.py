"""Pruning inside a trial's tune process: each streamed validation loss goes to the trial (`trial.report` at its
training step, negated, since the study maximizes F1); when the study's pruner says stop, the job is cancelled
through the provider (local and transformers trainers stopped, hosted jobs get their cancel call) and the run ends
KILLED with `finetune.end_reason = pruned at step N (<value> vs <reference>)`.

The search hands the trial to its tune process in the environment (`TRIAL_ENV`: storage, study, trial id and the
pruner's settings; the storage URL may hold a password, and the environment is never logged). Tags written on a
pruned run: `finetune.pruned_step`, `finetune.pruned_val_loss`, `finetune.pruned_reference`; metric
`pruned_cost_avoided_usd` when the job had a cost estimate (the estimate of the steps not trained).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import sys
from collections.abc import Callable
from typing import Any

from mlflow.tracking import MlflowClient

from finetune_mlflow.errors import RunStopped
from finetune_mlflow.process import Terminated
from finetune_mlflow.providers.base import TERMINAL_STATES, MetricPoint, Provider, TuningJob
from finetune_mlflow.tracking import log_values

logger = logging.getLogger(__name__)

TRIAL_ENV = "FINETUNE_SEARCH_TRIAL"
METRIC = "val_loss"
PRUNED_STEP_TAG = "finetune.pruned_step"


def reference_text(spec: dict[str, Any], study: Any, step: int) -> str:
    """What the pruner compared against, in val_loss terms: the median of completed trials at this step, or the
    Hyperband rung (which keeps the best 1/reduction_factor of the trials that reached it)."""
    from optuna.trial import TrialState

    if spec["pruner"] == "median":
        values = [-t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if step in t.intermediate_values]
        return f"median {statistics.median(values):.4g} of {len(values)} completed trials" if values else "median"
    return f"hyperband rung cut, keeping the best 1/{spec['factor']}"


def pruned_reason(step: int, best_loss: float, reference: str) -> str:
    return f"pruned at step {step} ({METRIC} {best_loss:.4g} vs {reference})"


def cost_avoided(estimated_cost: float | None, step: int, total_steps: int | None) -> float | None:
    """The estimated cost of the steps not trained, where both the job's estimate and its length are known."""
    if estimated_cost is None or not total_steps or step >= total_steps:
        return None
    return estimated_cost * (1 - step / total_steps)


def _end_with_worker(worker_pid: int) -> None:
    """A trial's tune process gets SIGTERM when its worker dies (kill -9 included): the run ends KILLED, the job
    keeps running, and the worker that retries the trial reattaches to both."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != worker_pid:  # the worker died before the line above
        raise Terminated(signal.SIGTERM)


def total_steps(job: TuningJob, n_train: float | None) -> int | None:
    """The job's length in steps: as the provider says, else epochs x ceil(examples / batch size) from the
    hyperparameters the job reports under the shared names (a hosted job resolves "auto" once it runs)."""
    if job.total_steps:
        return job.total_steps
    try:
        epochs, batch = int(job.hyperparameters["epochs"]), int(job.hyperparameters["batch_size"])
    except (KeyError, ValueError):
        return None
    return epochs * math.ceil(n_train / batch) if n_train and batch > 0 else None


def trial_pruner(provider: Provider, run_id: str) -> Callable[[TuningJob, list[MetricPoint]], None] | None:
    """The `stream_job` hook of a trial's tune process, or None when no search started this process."""
    handed = os.environ.get(TRIAL_ENV)
    if not handed:
        return None
    import optuna

    from finetune_mlflow.search.study import open_storage, pruner

    spec = json.loads(handed)
    _end_with_worker(spec["worker_pid"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]),
                              pruner=pruner(spec["pruner"]))
    trial = optuna.trial.Trial(study, spec["trial_id"])
    # What the trial already holds (a retried trial inherits its first attempt's values): never reported twice.
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == spec["number"])
    reported = {step: -value for step, value in frozen.intermediate_values.items()}  # step -> val_loss

    def on_points(job: TuningJob, points: list[MetricPoint]) -> None:
        losses = sorted((p for p in points if p.key == METRIC), key=lambda p: p.step)
        for point in losses:
            if point.step not in reported:
                trial.report(-point.value, point.step)
                reported[point.step] = point.value
        # Every point is reported, those a finished job left for the last poll too (a fast trial that ended before
        # its first poll would otherwise give the pruner no reference); only a running job can be pruned.
        if not losses or job.state in TERMINAL_STATES or not trial.should_prune():
            return
        step = losses[-1].step
        best = min(reported.values())
        reason = pruned_reason(step, best, reference_text(spec["pruner"], study, step))
        logger.info("trial %s: %s; cancelling job %s", spec["number"], reason, job.job_id)
        provider.cancel_job(job.job_id)
        client = MlflowClient()
        metrics = client.get_run(run_id).data.metrics
        avoided = cost_avoided(metrics.get("estimated_cost_usd"), step, total_steps(job, metrics.get("n_train")))
        log_values(client, run_id, metrics={"pruned_cost_avoided_usd": round(avoided, 4)} if avoided else None,
                   tags={PRUNED_STEP_TAG: str(step), "finetune.pruned_val_loss": f"{best:.6g}",
                         "finetune.pruned_reference": reason.split(" vs ", 1)[1].rstrip(")")})
        raise RunStopped(reason)

    return on_points

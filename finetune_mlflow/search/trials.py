"""One worker of a search: ask the study for trials until it holds `n_trials` (all workers together), run each as
a `tune` child process under the sweep parent, and tell the study how it ended (eval_f1, pruned, failed).

A trial's child run is tagged `finetune.study` and `finetune.trial_number`, and the trial records its run id
(`run_id` user attribute), so a trial retried after its worker died (same parameters, see `study`) reattaches to
the same run and job instead of training again, and a trial already finished is never run twice. While nothing is
left to ask for and another worker's trial is still RUNNING, a worker keeps looking, so a dead worker's trial is
failed and retried by a live one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config, with_overrides
from finetune_mlflow.liveness import pid_alive
from finetune_mlflow.ownership import OWNER_TAG
from finetune_mlflow.search.pruning import PRUNED_STEP_TAG, TRIAL_ENV
from finetune_mlflow.search.space import SearchPlan
from finetune_mlflow.search.study import WORKER_ATTR, fail_dead_trials, worker_id
from finetune_mlflow.sweep_plan import point_key

logger = logging.getLogger(__name__)

STUDY_TAG = "finetune.study"
TRIAL_TAG = "finetune.trial_number"
RUN_ATTR = "run_id"
SURPLUS_ATTR = "surplus"
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Launch:
    """What every trial of this worker shares."""

    config: Config
    plan: SearchPlan
    parent: mlflow.entities.Run
    storage: str
    pruner: dict[str, Any]
    logs: Path
    say: Callable[[str], None]


def counted(trials: list) -> list:
    """The trials that count toward n_trials: all but a failed trial that was queued again (its retry counts)
    and a surplus trial (asked by two workers at the same moment, never run)."""
    from optuna.trial import TrialState

    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR)
            and not (t.state is TrialState.FAIL and t.number in retried)]


def suggest(trial: Any, plan: SearchPlan) -> dict[str, Any]:
    """The trial's point, under dotted config keys (a retried trial gets its first attempt's values back)."""
    values = {}
    for d in plan.space:
        if d.kind == "categorical":
            values[d.key] = trial.suggest_categorical(d.key, list(d.choices))
        elif d.kind == "int":
            values[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            values[d.key] = trial.suggest_float(d.key, d.low, d.high, step=d.step, log=d.log)
    return values


def _next_trial(study: Any, plan: SearchPlan, lock: threading.Lock, stop: threading.Event) -> Any | None:
    """The next trial to run (a queued retry first), or None when the study holds n_trials and none is running."""
    from optuna.trial import TrialState

    while not stop.is_set():
        with lock:
            for number in fail_dead_trials(study):
                logger.warning("trial %s lost its worker; queued again with the same parameters", number)
            trials = counted(study.get_trials(deepcopy=False))
            if len(trials) < plan.n_trials or any(t.state is TrialState.WAITING for t in trials):
                trial = study.ask()
                frozen = study.get_trials(deepcopy=False)
                mine = next(t for t in frozen if t.number == trial.number)
                earlier = [t for t in counted(frozen) if t.number < trial.number]
                if "failed_trial" not in mine.system_attrs and len(earlier) >= plan.n_trials:
                    trial.set_user_attr(SURPLUS_ATTR, True)  # another worker asked in the same instant
                    study.tell(trial, state=TrialState.FAIL)
                    return None
                trial.set_user_attr(WORKER_ATTR, worker_id())
                return trial
            if not any(t.state is TrialState.RUNNING for t in trials):
                return None
        stop.wait(POLL_SECONDS)  # another worker's trial runs: watch it, to retry it should its worker die
    return None


def _command(launch: Launch, values: dict[str, Any]) -> list[str]:
    command = [sys.executable, "-m", "finetune_mlflow", "tune", "--config", launch.config.config_file]
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    return command


def _wait_released(client: MlflowClient, run_id: str) -> mlflow.entities.Run:
    """The run once no live process of this machine holds it (a dead worker's tune process ends KILLED first)."""
    while True:
        run = client.get_run(run_id)
        owner_host, _, pid = run.data.tags.get(OWNER_TAG, "").rpartition(":")
        if run.info.status != "RUNNING" or owner_host != worker_id().rpartition(":")[0] or not pid.isdigit() \
                or not pid_alive(int(pid)):
            return run
        time.sleep(POLL_SECONDS)


def _ended(run: mlflow.entities.Run) -> str | None:
    """How an earlier attempt's run ended, when it needs no new process: FINISHED or pruned."""
    if run.info.status == "FINISHED":
        return "FINISHED"
    if run.info.status == "KILLED" and PRUNED_STEP_TAG in run.data.tags:
        return "PRUNED"
    return None


def _child_run(launch: Launch, trial: Any, values: dict[str, Any], study_name: str) -> tuple[str, bool]:
    """(run id, reattached): the run a retried trial already has, else a new tune child under the parent."""
    client = MlflowClient()
    existing = trial.user_attrs.get(RUN_ATTR)
    tags = {STUDY_TAG: study_name, TRIAL_TAG: str(trial.number)}
    if existing:
        client.set_tag(existing, TRIAL_TAG, str(trial.number))
        return existing, True
    name = f"{with_overrides(launch.config, values).run_name('tune')} #{trial.number}"
    run = client.create_run(launch.parent.info.experiment_id, run_name=name, tags={
        "mlflow.parentRunId": launch.parent.info.run_id, "finetune.step": "tune",
        "finetune.sweep_point": point_key(values), **tags})
    trial.set_user_attr(RUN_ATTR, run.info.run_id)
    return run.info.run_id, False


def run_trial(study: Any, trial: Any, launch: Launch) -> str:
    """Run (or reattach) one trial and tell the study its end; returns COMPLETE, PRUNED or FAIL."""
    from optuna.trial import TrialState

    values = suggest(trial, launch.plan)
    run_id, reattached = _child_run(launch, trial, values, study.study_name)
    client = MlflowClient()
    run = _wait_released(client, run_id) if reattached else client.get_run(run_id)
    ended = _ended(run) if reattached else None
    label = f"trial {trial.number} {describe(values)}"
    code = 0
    if ended is None:
        launch.say(f"{label}: {'reattaching' if reattached else 'launching'} (run {run_id})")
        spec = {"storage": launch.storage, "study": study.study_name, "trial_id": trial._trial_id,
                "number": trial.number, "pruner": launch.pruner, "worker_pid": os.getpid()}
        env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": launch.parent.info.experiment_id,
               TRIAL_ENV: json.dumps(spec)}
        env.pop("MLFLOW_EXPERIMENT_NAME", None)
        log_path = launch.logs / f"{run_id}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(_command(launch, values), env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
            _wait_beating(study, trial, process)
            code = process.returncode
        run = client.get_run(run_id)
        ended = _ended(run)
    else:
        launch.say(f"{label}: ended {ended.lower()} earlier (run {run_id}), kept")
    if ended == "FINISHED" and "eval_f1" in run.data.metrics:
        study.tell(trial, run.data.metrics["eval_f1"], skip_if_finished=True)
        launch.say(f"{label}: F1 {run.data.metrics['eval_f1']:.2f}")
        return "COMPLETE"
    if ended == "PRUNED":
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        launch.say(f"{label}: {run.data.tags.get('finetune.end_reason', 'pruned')}")
        return "PRUNED"
    reason = run.data.tags.get("finetune.end_reason") or f"tune exited {code}"
    trial.set_user_attr("error", reason[:500])
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    launch.say(f"{label}: FAILED: {reason[:300]}")
    return "FAIL"


def describe(values: dict[str, Any]) -> str:
    """`learning_rate=0.0123, epochs=2`: a trial's point as the terminal shows it."""
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float)
                     else f"{key.rsplit('.', 1)[-1]}={value}" for key, value in values.items())


def _wait_beating(study: Any, trial: Any, process: subprocess.Popen) -> None:
    """Wait for the trial's process, recording the trial's heartbeat where the storage keeps one (RDB)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    beat = is_heartbeat_enabled(storage)
    interval = storage.get_heartbeat_interval() if beat else 60
    while True:
        if beat:
            storage.record_heartbeat(trial._trial_id)
        try:
            process.wait(timeout=interval)
            return
        except subprocess.TimeoutExpired:
            continue


def work(study: Any, launch: Launch, parallel: int) -> dict[str, int]:
    """Run trials on `parallel` threads until the study is done; returns how this worker's trials ended."""
    lock, stop = threading.Lock(), threading.Event()
    ends: dict[str, int] = {}
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while (trial := _next_trial(study, launch.plan, lock, stop)) is not None:
                end = run_trial(study, trial, launch)
                with lock:
                    ends[end] = ends.get(end, 0) + 1
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=loop, name=f"trial-{i}", daemon=True) for i in range(max(1, parallel))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=1)
    finally:
        stop.set()
    if errors:
        raise errors[0]
    return ends

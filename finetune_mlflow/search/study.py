"""The Optuna study behind a search: where it lives (`sweep.storage`), how it samples and prunes, and how a trial
whose worker died is failed and queued again.

Storage: a PostgreSQL (or any SQLAlchemy) URL gives Optuna's RDBStorage with a heartbeat: a worker that stops
beating for `GRACE_SECONDS` has its trial failed by whichever worker looks next, and RetryHeartbeatStaleTrialCallback
queues the same parameters again. Anything else is a journal file (JournalStorage, safe for several processes on
one machine); by default `<folder of the embedded MLflow store>/optuna/<study>.journal`. Optuna 5.0's journal
storage keeps no heartbeat, and its workers all run on this machine, so a RUNNING trial whose worker process is gone
(`finetune.worker` = host:pid, pid dead) is failed and handed to the same retry callback.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

from finetune_mlflow.errors import ConfigError
from finetune_mlflow.liveness import pid_alive
from finetune_mlflow.search.space import SearchPlan

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
MAX_RETRIES = 3
WORKER_ATTR = "finetune.worker"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_url(storage: str) -> bool:
    return "://" in storage


def redacted(storage: str) -> str:
    """The storage as it may appear in params, tags and logs: a URL's password replaced by ***."""
    if not is_url(storage):
        return storage
    parts = urllib.parse.urlsplit(storage)
    if parts.password is None:
        return storage
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def default_journal(tracking_uri: str, study_name: str) -> str:
    """A journal file beside the embedded MLflow store; a remote tracking server has no such folder."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme == "sqlite":
        folder = Path(urllib.parse.unquote(tracking_uri.split(":///", 1)[-1] if ":///" in tracking_uri
                                           else parts.path)).parent
    elif parts.scheme in ("", "file"):
        folder = Path(urllib.parse.unquote(parts.path)).parent
    else:
        raise ConfigError(f"sweep.storage is empty but the tracking store {parts.scheme}://{parts.hostname or ''} "
                          "is not a local file: set sweep.storage to a postgresql:// URL every worker reaches (or "
                          "a journal file path for workers on one machine)")
    return str(folder / "optuna" / f"{study_name}.journal")


def quiet() -> None:
    """Optuna's heartbeat retry and stale-trial check are marked experimental, and `ask` warns that heartbeats are
    meant for `Study.optimize`: the worker records each trial's heartbeat itself (`trials._wait_beating`), so
    neither warning says anything to a user."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(storage: str) -> Any:
    import optuna

    quiet()

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)
    if is_url(storage):
        try:
            return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=retry)
        except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable server is a one-line config error
            raise ConfigError(f"sweep.storage {redacted(storage)}: cannot open the study database "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    from optuna.storages.journal import JournalFileBackend

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(storage))


def sampler(plan: SearchPlan, *, joined: bool) -> Any:
    """The plan's sampler; a joined worker seeds differently, or two workers would propose the same points."""
    import optuna

    seed = plan.seed + (os.getpid() if joined else 0)
    if plan.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.sampler_startup_trials)


def pruner_spec(plan: SearchPlan) -> dict[str, Any]:
    """What a trial's tune process needs to rebuild the pruner (Optuna keeps pruners out of storage)."""
    return {"pruner": plan.pruner, "warmup": plan.pruner_warmup_steps, "startup": plan.pruner_startup_trials,
            "min_steps": plan.hyperband_min_steps, "factor": plan.hyperband_reduction_factor}


def pruner(spec: dict[str, Any]) -> Any:
    import optuna

    if spec["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec["startup"], n_warmup_steps=spec["warmup"])
    if spec["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec["min_steps"], reduction_factor=spec["factor"])
    return optuna.pruners.NopPruner()


def open_study(storage: str, name: str, plan: SearchPlan, *, create: bool, joined: bool = False) -> Any:
    """The study (created when `create`, else it must exist): direction maximize, the objective being eval_f1."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = open_storage(storage)
    kwargs = {"study_name": name, "storage": backend, "sampler": sampler(plan, joined=joined),
              "pruner": pruner(pruner_spec(plan))}
    if create:
        return optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)
    try:
        return optuna.load_study(**kwargs)
    except KeyError:
        raise ConfigError(f"no study {name!r} in {redacted(storage)} to join") from None


def fail_dead_trials(study: Any) -> list[int]:
    """Fail the study's stale RUNNING trials and queue their retries; returns the failed trials' numbers.
    RDB storage: Optuna's heartbeat check. Both storages: a trial whose worker ran on this host and is gone."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage  # Optuna's own fail_stale_trials reads it the same way
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES,
                                                             inherit_intermediate_values=True)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get(WORKER_ATTR, ""))
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(after - before)

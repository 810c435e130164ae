"""`sweep` with `search: random | tpe`: validate the space and price the study's worst case before anything
starts, open the sweep parent and its Optuna study, prepare and evaluate the base model once, then run trials
(`trials.work`) and leave the study's report on the parent. `-P join=true` adds a worker to the running sweep of
the same experiment file (found by its `finetune.search_config` tag, or by `sweep.study_name`): its trials land
under that parent. A rerun with `--run-id <parent>` reopens the parent's study and continues it.

Params: `search`, `n_trials`, `pruner`, `space`, `study_name`, `study_storage` (password redacted), `provider`,
`config_file`, `max_parallel_jobs`. Tags: `finetune.study_name`, `finetune.search_config`; the summary tags and
metrics of `report.log_search_report`. Metric `sweep_estimated_cost_usd` (n_trials x the costliest corner).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow import ownership
from finetune_mlflow.config import Config, section_lines, with_overrides
from finetune_mlflow.costing import check_cost_limit
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.job_tracking import request_for
from finetune_mlflow.preparation import Prepared, ensure_prepared
from finetune_mlflow.providers import get_provider
from finetune_mlflow.scoring import base_evaluation
from finetune_mlflow.registry import register_logged
from finetune_mlflow.search.report import log_search_report
from finetune_mlflow.search.space import SearchPlan, check_space, plan_search
from finetune_mlflow.search.study import default_journal, open_study, pruner_spec, redacted, worker_id
from finetune_mlflow.search.trials import Launch, work
from finetune_mlflow.tracking import log_values, quote, step_run

logger = logging.getLogger(__name__)

STUDY_NAME_TAG = "finetune.study_name"
CONFIG_TAG = "finetune.search_config"
PARENT_ATTR = "parent_run_id"
READY_ATTR = "ready"
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class SearchPoint:
    """A trial as the sweep command reports it (the shape of `sweep.Point`)."""

    values: dict
    config: Config
    run_id: str
    status: str  # FINISHED, KILLED (pruned), FAILED
    metrics: dict


@dataclass(frozen=True)
class SearchResult:
    run_id: str
    points: list[SearchPoint]
    winner: SearchPoint | None  # the recommended trial


def _price(configs: list[Config], prepared: Prepared, parent_id: str, plan: SearchPlan) -> float | None:
    """n_trials x the costliest corner of the space; None when a corner's cost cannot be estimated. Refuses the
    study above `max_cost_usd` (or with an unknown price under a limit) before any trial launches."""
    worst: float | None = 0.0
    for config in configs:
        provider = get_provider(config.tune.provider, config)
        cost = provider.preflight(request_for(config, parent_id, prepared)).estimated_cost_usd
        worst = None if worst is None or cost is None else max(worst, cost)
    total = None if worst is None else worst * plan.n_trials
    check_cost_limit(total, plan.max_cost_usd, setting="sweep.max_cost_usd",
                     what=f"the study's {plan.n_trials} trials at the costliest corner of sweep.space (nothing was "
                          "launched)", price_key=f"{configs[0].tune.provider}.training_price_per_million_tokens",
                     remedy="narrow sweep.space or lower sweep.n_trials")
    return total


def _say(line: str) -> None:
    print(f"search: {line}", flush=True)


def _launch(config: Config, plan: SearchPlan, parent: Any, storage: str, logs: Path) -> Launch:
    return Launch(config, plan, parent, storage, pruner_spec(plan), logs, _say)


def _storage(plan: SearchPlan, study_name: str) -> str:
    return plan.storage or default_journal(mlflow.get_tracking_uri(), study_name)


def run_search(config: Config, block: Any, *, promote: bool = False, join: bool = False) -> SearchResult:
    """The sweep entry point for a search block."""
    source = config.config_file
    lines = section_lines(source, "sweep")
    plan = plan_search(block, source, lines)
    corners = check_space(plan, config, with_overrides, source, lines)  # every axis valid, or nothing starts
    provider = get_provider(config.tune.provider, config)
    parallel = plan.max_parallel_jobs or provider.max_parallel_jobs
    config_sha = config.sha256() + ":" + json.dumps(block, sort_keys=True, default=str)
    config_key = f"{Path(source).name}:{__import__('hashlib').sha256(config_sha.encode()).hexdigest()[:16]}"
    if join:
        return _join(config, plan, config_key, parallel)
    name = f"search {config.tune.provider}/{config.tune.base_model} {plan.method} {plan.n_trials} trials"
    with step_run("sweep", run_name=name, tags={CONFIG_TAG: config_key, "finetune.search": plan.method}) as run:
        run_id = run.info.run_id
        client = MlflowClient()
        parent = client.get_run(run_id)
        study_name = parent.data.tags.get(STUDY_NAME_TAG) or plan.study_name or f"{Path(source).stem}-{run_id[:8]}"
        storage = _storage(plan, study_name)
        study = open_study(storage, study_name, plan, create=True)
        study.set_user_attr(PARENT_ATTR, run_id)
        log_values(client, run_id, tags={STUDY_NAME_TAG: study_name, "finetune.study_storage": redacted(storage)},
                   params={"provider": config.tune.provider, "config_file": source, "search": plan.method,
                           "n_trials": plan.n_trials, "pruner": plan.pruner, "max_parallel_jobs": parallel,
                           "space": json.dumps({d.key: d.choices or [d.low, d.high] for d in plan.space})[:6000],
                           "study_name": study_name, "study_storage": redacted(storage)})
        _say(f"study {study_name} in {redacted(storage)}; join with -P join=true")
        prepared = ensure_prepared(config)
        cost = _price(corners, prepared, run_id, plan)
        if cost is not None:
            log_values(client, run_id, metrics={"sweep_estimated_cost_usd": round(cost, 4)})
        for base_model in dict.fromkeys(c.tune.base_model for c in corners):
            base_config = next(c for c in corners if c.tune.base_model == base_model)
            base_evaluation(base_config, prepared, get_provider(base_config.tune.provider, base_config))
        study.set_user_attr(READY_ATTR, True)
        with tempfile.TemporaryDirectory(prefix="search-logs-") as logs:
            ends = work(study, _launch(config, plan, parent, storage, Path(logs)), parallel)
        return _finish(config, plan, study, run_id, ends, promote, owner=True)


def _find_parent(config: Config, plan: SearchPlan, config_key: str) -> tuple[Any, str]:
    """The running sweep this worker joins and its study name."""
    client = MlflowClient()
    if plan.study_name:
        study = open_study(_storage(plan, plan.study_name), plan.study_name, plan, create=False, joined=True)
        parent_id = study.user_attrs.get(PARENT_ATTR)
        if not parent_id:
            raise ConfigError(f"study {plan.study_name!r} has no sweep parent run to join")
        return client.get_run(parent_id), plan.study_name
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{CONFIG_TAG}` = {quote(config_key)} and "
                              "attributes.status = 'RUNNING'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or STUDY_NAME_TAG not in runs[0].data.tags:
        raise ConfigError(f"join=true: no running sweep of {config.config_file} (with this very sweep block) to join "
                          f"in {mlflow.get_tracking_uri()}; start one without join first, or set sweep.study_name")
    return runs[0], runs[0].data.tags[STUDY_NAME_TAG]


def _wait_ready(study: Any, client: MlflowClient, parent_id: str) -> None:
    """A joined worker starts once the owner has prepared, priced and evaluated the base model."""
    while not study.user_attrs.get(READY_ATTR):
        status = client.get_run(parent_id).info.status
        if status != "RUNNING":
            raise ConfigError(f"join=true: the sweep {parent_id} ended {status} before its study was ready")
        time.sleep(POLL_SECONDS)


def _join(config: Config, plan: SearchPlan, config_key: str, parallel: int) -> SearchResult:
    client = MlflowClient()
    parent, study_name = _find_parent(config, plan, config_key)
    storage = _storage(plan, study_name)
    study = open_study(storage, study_name, plan, create=False, joined=True)
    _wait_ready(study, client, parent.info.run_id)
    _say(f"joining study {study_name} of sweep {parent.info.run_id} as worker {worker_id()}")
    with step_run("sweep_worker", run_name=f"worker {worker_id()} of {study_name}",
                  tags={"mlflow.parentRunId": parent.info.run_id, STUDY_NAME_TAG: study_name}):
        with tempfile.TemporaryDirectory(prefix="search-logs-") as logs:
            ends = work(study, _launch(config, plan, parent, storage, Path(logs)), parallel)
        return _finish(config, plan, study, parent.info.run_id, ends, promote=False, owner=False)


def _finish(config: Config, plan: SearchPlan, study: Any, parent_id: str, ends: dict[str, int], promote: bool, *,
            owner: bool) -> SearchResult:
    """The report on the parent (every worker); the owner, last to finish, registers and promotes the choice."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        ownership.end_stale_children(parent_id)  # a worker killed with -9 left its own run RUNNING
    found, choice = log_search_report(parent_id, study, samples=config.evaluate.bootstrap_samples,
                                      seed=config.evaluate.bootstrap_seed)
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    points = [SearchPoint(dict(o.params), with_overrides(config, o.params), o.run_id, status.get(o.state, o.state), {"eval_f1": o.f1} if o.f1 else {})
              for o in found]
    winner = next((p for p in points if choice and p.run_id == choice.recommended.run_id), None)
    _say(f"this worker: {ends}; study: {sum(o.state == 'COMPLETE' for o in found)} completed, "
         f"{sum(o.state == 'PRUNED' for o in found)} pruned, {sum(o.state == 'FAIL' for o in found)} failed"
         + (f"; recommended trial {choice.recommended.number} ({choice.reason})" if choice else ""))
    # Trials carry a sweep point, so their tune runs log their models and register none (as a grid's children):
    # the recommended one becomes the search's one version of the production name.
    version = register_logged(winner.run_id, config.tune.registered_model_name) if owner and winner else None
    if version is not None:
        log_values(MlflowClient(), parent_id, tags={"finetune.registered_version": f"{version.name}/{version.version}"})
        _say(f"registered the recommended trial as {version.model_uri}")
    if promote and winner is not None:
        if version is None:
            raise ConfigError(f"the recommended trial's run {winner.run_id} registered no model version; nothing to "
                              "promote")
        from finetune_mlflow.steps.promote import run_promote

        run_promote(config, model_name=version.name, version=version.version)
    return SearchResult(parent_id, points, winner)

"""Thin MLflow helpers shared by the steps: deduplicated batched metrics, run lookups, step runs that never stay
RUNNING. Works against any tracking store (file, SQLite, PostgreSQL behind `mlflow server`)."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Iterable, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from finetune_mlflow.providers.base import MetricPoint

logger = logging.getLogger(__name__)

# MLflow's log_batch accepts at most 1000 metrics per call.
MAX_METRICS_PER_BATCH = 1000
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class MetricSink:
    """Logs metric points with `log_batch`, skipping any (key, step) the run already holds.

    The run's own history is the source of truth, so a rerun after a crash (even one between logging and
    saving the provider cursor) never writes a step twice.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self._seen: dict[str, set[int]] = {}

    def _steps(self, key: str) -> set[int]:
        if key not in self._seen:
            self._seen[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return self._seen[key]

    def log(self, points: Iterable[MetricPoint]) -> int:
        """Log what is new; a step counts as logged only once its batch was accepted, so a failed call
        (tracking server briefly down) can simply be repeated with the same points."""
        fresh: dict[tuple[str, int], Metric] = {}
        for point in points:
            if point.step not in self._steps(point.key):
                fresh[(point.key, point.step)] = Metric(point.key, point.value, point.timestamp_ms, point.step)
        metrics = list(fresh.values())
        for begin in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            batch = metrics[begin: begin + MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=batch)
            for metric in batch:
                self._seen[metric.key].add(metric.step)
        return len(metrics)


def log_values(client: MlflowClient, run_id: str, *, metrics: dict[str, float] | None = None,
               params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
    """One round trip for a step's summary values (params already on the run with the same value are skipped)."""
    now = int(time.time() * 1000)
    existing = client.get_run(run_id).data.params if params else {}
    for key in sorted(set(params or {}) & set(existing)):
        if existing[key] != str(params[key]):
            # `mlflow run -P key=value` logged the user's own spelling (e.g. 1e-2 for 0.01); a rerun with
            # --run-id and different values reattaches to the job the first values launched.
            logger.info("param %s stays %r as logged (resolved value %r)", key, existing[key], params[key])
    fresh_params = [Param(k, str(v)) for k, v in (params or {}).items() if k not in existing]
    metric_list = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for begin in range(0, max(len(metric_list), 1), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metric_list[begin: begin + MAX_METRICS_PER_BATCH],
                         params=fresh_params if begin == 0 else [], tags=tag_list if begin == 0 else [])


def git_commit() -> str:
    """The project's commit, or "none" outside a git checkout (so lookups still compare equal strings)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none"


def quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def find_finished_run(experiment_id: str, **tags: str) -> mlflow.entities.Run | None:
    """Newest FINISHED run of the experiment whose `finetune.*` tags equal the given strings."""
    clauses = [f"tags.`finetune.{key}` = {quote(value)}" for key, value in tags.items()]
    clauses.append("attributes.status = 'FINISHED'")
    runs = MlflowClient().search_runs([experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"],
                                      max_results=1)
    return runs[0] if runs else None


@contextlib.contextmanager
def step_run(step: str, *, run_name: str | None = None, tags: dict[str, str] | None = None
             ) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, under `mlflow run --run-id`) the run for a step; nested when a parent is active.

    Any exception ends the run FAILED before it propagates: no run is left RUNNING.
    """
    parent = mlflow.active_run()
    with ending_run(mlflow.start_run(run_name=run_name, nested=parent is not None, tags={
            "finetune.step": step, "finetune.git_commit": git_commit(), **(tags or {})})) as run:
        yield run


@contextlib.contextmanager
def ending_run(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End a started run FINISHED, or FAILED if anything (even KeyboardInterrupt) escapes the block."""
    try:
        yield run
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_json(payload: object, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(payload, indent=2, sort_keys=True, default=str), artifact_file)

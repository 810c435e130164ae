"""sweep: one tune run per point of the config's `sweep.grid`, as children of one `sweep` parent run.

Prepare runs once and the base model is evaluated once per base model, under the parent; every point's config is
validated and the whole grid priced before any job starts (nothing launches above `sweep.max_cost_usd`). Children
run as `tune` processes, at most `max_parallel_jobs` at once; a failed child is reported and does not stop the
others. Each child carries `finetune.sweep_point`, so rerunning with `--run-id <parent>` skips finished points,
reattaches unfinished ones to their job (never a second job for a point) and launches only missing points. The
parent picks the winner (the report's rule: highest F1, then lower p95 latency, then lower cost) and registers it
as the sweep's one model version (children log their models but register none), attaches
the comparison report (`report/report.html`), logs the grid as a table (`sweep_grid.json`), the winner's headline
metrics and a description, and with `-P promote=true` hands the winner to `promote`, gates and all.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config, read_raw_section, with_overrides
from finetune_mlflow.costing import check_cost_limit
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.job_tracking import request_for
from finetune_mlflow.preparation import Prepared, ensure_prepared
from finetune_mlflow.providers import get_provider
from finetune_mlflow.registry import SWEEP_POINT_TAG, RegisteredVersion, register_logged
from finetune_mlflow.scoring import base_evaluation
from finetune_mlflow.steps.promote import run_promote
from finetune_mlflow.summary import HEADLINE_METRICS, describe_tune
from finetune_mlflow.report import from_parent, log_report, pick_winner
from finetune_mlflow.run_cost import bills
from finetune_mlflow.sweep_children import Children, Stopped, end_if_running, exit_reason, wait_for_owner
from finetune_mlflow.sweep_plan import SweepPlan, child_value, plan_sweep, point_key
from finetune_mlflow.tracking import log_values, quote, step_run

logger = logging.getLogger(__name__)

POINT_TAG = SWEEP_POINT_TAG  # a child run carries its grid point; it logs its model, registers none


@dataclass(frozen=True)
class Point:
    values: dict
    config: Config
    run_id: str = ""
    status: str = ""
    metrics: dict | None = None


@dataclass(frozen=True)
class SweepResult:
    run_id: str
    points: list[Point]
    winner: Point | None


def _price(points: list[Point], prepared: Prepared, parent_id: str, plan: SweepPlan) -> float | None:
    """Sum of the points' preflight estimates, None when any point's cost is unknown (an unpriced base model);
    refuses the grid above `max_cost_usd`, or with an unknown cost under a limit, before anything launches."""
    total: float | None = 0.0
    unpriced = ""
    for point in points:
        provider = get_provider(point.config.tune.provider, point.config)
        report = provider.preflight(request_for(point.config, parent_id, prepared))
        if report.estimated_cost_usd is None and bills(point.config, point.config.tune.provider):
            total, unpriced = None, unpriced or point.config.tune.base_model  # the grid's cost is then unknown
        elif total is not None:
            total += report.estimated_cost_usd or 0.0
    check_cost_limit(total, plan.max_cost_usd, what=f"the sweep's {len(points)} jobs (nothing was launched)",
                     price_key=f"{points[0].config.tune.provider}.training_price_per_million_tokens",
                     unpriced=unpriced)
    return total


def _children(parent: mlflow.entities.Run) -> dict[str, mlflow.entities.Run]:
    """The parent's existing children by grid point (a rerun with --run-id <parent> finds them)."""
    runs = MlflowClient().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = {quote(parent.info.run_id)}", max_results=1000)
    return {r.data.tags[POINT_TAG]: r for r in runs if POINT_TAG in r.data.tags}


def _child_command(point: Point) -> list[str]:
    command = [sys.executable, "-m", "finetune_mlflow", "tune"]
    if point.config.config_file:
        command += ["--config", point.config.config_file]
    for key, value in point.values.items():
        command += ["--set", f"{key}={child_value(value)}"]
    return command


class _Tally:
    """One line per child transition and a running tally, from the worker threads."""

    def __init__(self, total: int):
        self.total, self.done, self.failed = total, 0, 0
        self._lock = threading.Lock()

    def say(self, point: Point, what: str, *, finished: bool = False, failed: bool = False) -> None:
        with self._lock:
            self.done += finished or failed
            self.failed += failed
            print(f"sweep [{self.done}/{self.total} done, {self.failed} failed] {point.config.run_name('tune')}: "
                  f"{what}", flush=True)


def _run_child(point: Point, parent: mlflow.entities.Run, existing: mlflow.entities.Run | None, logs: Path,
               tally: _Tally, children: Children) -> Point:
    client = MlflowClient()
    if existing is not None:  # an orphan of a parent killed -9 may still be at work: watch it, never launch twice
        wait_for_owner(client, existing.info.run_id, point.config.tune.poll_interval,
                       lambda what: tally.say(point, what), stopped=lambda: bool(children.stopping))
        existing = client.get_run(existing.info.run_id)
        if children.stopping:  # stopped while watching: the run stays with the process that owns it
            return Point(point.values, point.config, existing.info.run_id, existing.info.status)
    if existing is not None and existing.info.status == "FINISHED":
        tally.say(point, "finished earlier, kept", finished=True)
        return Point(point.values, point.config, existing.info.run_id, "FINISHED", dict(existing.data.metrics))
    run = existing or client.create_run(parent.info.experiment_id, run_name=point.config.run_name("tune"), tags={
        "mlflow.parentRunId": parent.info.run_id, POINT_TAG: point_key(point.values), "finetune.step": "tune"})
    run_id = run.info.run_id
    tally.say(point, f"{'reattaching' if existing else 'launching'} (run {run_id})")
    log_path = logs / f"{run_id}.log"
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": parent.info.experiment_id}
    try:
        code = children.run(run_id, _child_command(point), env, log_path)
    except Stopped as stop:
        end_if_running(client, run_id, "KILLED", f"not launched: the sweep parent was stopping ({stop})")
        tally.say(point, "not launched: the sweep is stopping", failed=True)
        return Point(point.values, point.config, run_id, "KILLED")
    finished = client.get_run(run_id)
    if code != 0 or finished.info.status != "FINISHED":
        tally.say(point, f"{finished.info.status}: {exit_reason(code, log_path)}", failed=True)
        return Point(point.values, point.config, run_id, finished.info.status, dict(finished.data.metrics))
    tally.say(point, f"F1 {finished.data.metrics.get('eval_f1', float('nan')):.1f}", finished=True)
    return Point(point.values, point.config, run_id, "FINISHED", dict(finished.data.metrics))


def _record(parent_id: str, points: list[Point], best: Point | None) -> None:
    client = MlflowClient()
    grid_keys = sorted({k for p in points for k in p.values})
    table = {key: [str(p.values.get(key, "")) for p in points] for key in grid_keys}
    table.update(run_name=[p.config.run_name("tune") for p in points], run_id=[p.run_id for p in points],
                 status=[p.status for p in points])
    for metric in ("eval_f1", "eval_exact_match", "eval_f1_delta", "latency_ms_p95", "estimated_cost_usd"):
        table[metric] = [round((p.metrics or {}).get(metric, float("nan")), 3) for p in points]
    mlflow.log_table(table, "sweep_grid.json")
    metrics = {"sweep_n_points": len(points), "sweep_n_failed": sum(p.status != "FINISHED" for p in points)}
    tags = {"finetune.sweep_failed_runs": ",".join(p.run_id for p in points if p.status != "FINISHED")}
    if best is not None:
        metrics.update({k: v for k, v in (best.metrics or {}).items() if k in HEADLINE_METRICS})
        tags.update({"finetune.winner_run_id": best.run_id, "finetune.winner": best.config.run_name("tune"),
                     "mlflow.note.content": f"winner: {best.config.run_name('tune')}: "
                                            f"{describe_tune(best.metrics or {}, best.run_id)}"})
    log_values(client, parent_id, metrics=metrics, tags=tags)


def _point_config(config: Config, values: dict) -> Config:
    """A point's config, validated from the very strings its child will get (`--set key=value`)."""
    try:
        return with_overrides(config, {k: child_value(v) for k, v in values.items()})
    except ConfigError as e:
        raise ConfigError(f"{config.config_file}: sweep.grid point {point_key(values)}: {e}") from e


def run_sweep(config: Config, *, promote: bool = False) -> SweepResult:
    if not config.config_file:
        raise ConfigError("sweep needs an experiment file with a sweep: block: -P config=experiments/<file>.yaml")
    plan = plan_sweep(read_raw_section(config.config_file, "sweep"), config.config_file)
    points = [Point(values, _point_config(config, values)) for values in plan.points]  # all valid, or nothing runs
    provider = get_provider(config.tune.provider, config)
    parallel = plan.max_parallel_jobs or provider.max_parallel_jobs
    name = f"sweep {config.tune.provider}/{config.tune.base_model} {len(points)} points"
    with step_run("sweep", run_name=name) as run:
        parent = MlflowClient().get_run(run.info.run_id)
        log_values(MlflowClient(), run.info.run_id, params={
            "provider": config.tune.provider, "config_file": config.config_file, "n_points": len(points),
            "max_parallel_jobs": parallel, "grid": ",".join(sorted({k for p in plan.points for k in p}))})
        prepared = ensure_prepared(config)
        cost = _price(points, prepared, run.info.run_id, plan)
        if cost is not None:
            log_values(MlflowClient(), run.info.run_id, metrics={"sweep_estimated_cost_usd": round(cost, 4)})
        for base_model in dict.fromkeys(p.config.tune.base_model for p in points):
            base_config = next(p.config for p in points if p.config.tune.base_model == base_model)
            base_evaluation(base_config, prepared, get_provider(base_config.tune.provider, base_config))
        existing = _children(parent)
        tally = _Tally(len(points))
        with tempfile.TemporaryDirectory(prefix="sweep-logs-") as logs:
            done = _run_children(points, parent, existing, Path(logs), tally, parallel)
        collected = from_parent(run.info.run_id)
        best_record = pick_winner(collected.records)  # the report's rule: F1, then p95 latency, then cost
        best = next((p for p in done if best_record and p.run_id == best_record.run_id), None)
        version = _register_winner(best, run.info.run_id) if best is not None else None
        _record(run.info.run_id, done, best)
        log_report(run.info.run_id, collected.records, skipped=collected.skipped, source=f"sweep {name}")
        if promote and version is not None:
            run_promote(best.config, model_name=version.name, version=version.version)
        return SweepResult(run.info.run_id, done, best)


def _register_winner(best: Point, parent_id: str) -> RegisteredVersion:
    """The winner is the sweep's one registered version (its children only logged their models)."""
    version = register_logged(best.run_id, best.config.tune.registered_model_name)
    tag = {"finetune.registered_version": f"{version.name}/{version.version}"}
    log_values(MlflowClient(), best.run_id, tags=tag)
    log_values(MlflowClient(), parent_id, tags=tag)
    print(f"sweep winner {best.config.run_name('tune')} (run {best.run_id}): registered {version.model_uri}")
    return version


def _run_children(points: list[Point], parent: mlflow.entities.Run, existing: dict[str, mlflow.entities.Run],
                  logs: Path, tally: _Tally, parallel: int) -> list[Point]:
    """Every point's child, `parallel` at a time; a stop (SIGTERM, Ctrl-C, an error) stops the children first and
    ends their runs, so the parent never ends before them and never waits for their jobs."""
    children = Children()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = [pool.submit(_run_child, p, parent, existing.get(point_key(p.values)), logs, tally, children)
                   for p in points]
        return [future.result() for future in futures]
    except BaseException as e:
        stopped = children.stop(f"{type(e).__name__}: {e}", parent.info.run_id)
        logger.warning("sweep stopped (%s): ended %d running child run(s) KILLED; their jobs keep running",
                       type(e).__name__, len(stopped))
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


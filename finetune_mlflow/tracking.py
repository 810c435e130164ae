"""Thin MLflow helpers shared by the steps: deduplicated batched metrics, run lookups, step runs that never stay
RUNNING. Works against any tracking store (file, SQLite, PostgreSQL behind `mlflow server`)."""

from __future__ import annotations

import contextlib
import gc
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from finetune_mlflow import ownership
from finetune_mlflow.errors import RunStopped
from finetune_mlflow.process import UNENDED_RUNS
from finetune_mlflow.redaction import redact

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_EXPERIMENT_ID = "0"
# The run `mlflow run` opened in the Default experiment, when this process's runs went to the config's experiment.
_LAUNCHER: list[str] = []


class Point(Protocol):
    """A metric point as providers report it (`providers.base.MetricPoint`)."""

    key: str
    value: float
    step: int
    timestamp_ms: int


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

    def log(self, points: Iterable[Point]) -> int:
        """Log what is new; a step counts as logged only once its batch was accepted, so a failed call
        (tracking server briefly down) can simply be repeated with the same points."""
        fresh: dict[tuple[str, int], Metric] = {}
        for point in points:
            if point.step not in self._steps(point.key):
                fresh[(point.key, point.step)] = Metric(point.key, point.value, point.timestamp_ms, point.step)
        metrics = list(fresh.values())
        self.client.log_batch(self.run_id, metrics=metrics)  # MLflow splits it into requests of allowed size
        for metric in metrics:
            self._seen[metric.key].add(metric.step)
        return len(metrics)


def log_values(client: MlflowClient, run_id: str, *, metrics: dict[str, float] | None = None,
               params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
               model_id: str | None = None) -> None:
    """One round trip for a step's summary values (params already on the run with the same value are skipped)."""
    now = int(time.time() * 1000)
    existing = client.get_run(run_id).data.params if params else {}
    for key in sorted(set(params or {}) & set(existing)):
        if existing[key] != str(params[key]):
            # `mlflow run -P key=value` logged the user's own spelling (e.g. 1e-2 for 0.01); a rerun with
            # --run-id and different values reattaches to the job the first values launched.
            logger.info("param %s stays %r as logged (resolved value %r)", key, existing[key], params[key])
    fresh_params = [Param(k, str(v)) for k, v in (params or {}).items() if k not in existing]
    metric_list = [Metric(k, float(v), now, 0, model_id=model_id, run_id=run_id) for k, v in (metrics or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    client.log_batch(run_id, metrics=metric_list, params=fresh_params, tags=tag_list)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package's source files: a reused prepare or base evaluation was made by this very code
    (the prompt and the cleaning rules live in it), uncommitted edits included, with no git needed."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


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

    Any exception ends the run FAILED before it propagates: no run is left RUNNING. A run resumed by id
    (`--run-id`) is claimed first (`ownership.claim`: a second process gets RunHeld and the run is left as it
    is), and its children that a dead process left RUNNING are ended KILLED.
    """
    parent = mlflow.active_run()
    resumed = os.environ.get("MLFLOW_RUN_ID") if parent is None else None
    if resumed:
        ownership.claim(resumed)
    run = mlflow.start_run(run_name=run_name, nested=parent is not None, tags={
        "finetune.step": step, "finetune.code_version": code_version(), **(tags or {})})
    ownership.mark_owner(run.info.run_id)
    if resumed:
        ownership.end_stale_children(run.info.run_id)
    if parent is None and _LAUNCHER:
        MlflowClient().set_tag(_LAUNCHER[0], ownership.STEP_RUN_TAG, run.info.run_id)
    if parent is None:
        _end_stale_launchers()
    try:
        yield run
    except RunStopped as e:  # stopped on purpose (a pruned trial): KILLED with the reason as it is
        _end(run, "KILLED", str(e))
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (process.Terminated): stopped, not broken
        _reset_store_connections(e)
        _end(run, "KILLED", f"{type(e).__name__}: {e or 'interrupted'}")
        raise
    except BaseException as e:
        _end(run, "FAILED", f"{type(e).__name__}: {e}")
        raise
    else:
        mlflow.end_run("FINISHED")


def _reset_store_connections(interrupt: BaseException) -> None:
    """Release the SQL store's connections before ending runs after a signal: a session the signal interrupted
    mid-write stays referenced by the traceback's frames, its connection checked out and holding SQLite's write
    lock, and every write of the cleanup would then wait out the busy timeout and fail ("database is locked").
    Clearing those frames lets the session go (its transaction rolls back); closing the pool closes the rest."""
    # SQLAlchemy logs the interrupted cursor's failed close with a traceback: expected here, so kept quiet.
    with _quiet("sqlalchemy.pool"):
        traceback.clear_frames(interrupt.__traceback__)
        gc.collect()
        try:
            from mlflow.tracking._tracking_service.utils import _get_store

            engine = getattr(_get_store(), "engine", None)
            if engine is not None:
                engine.dispose()
        except Exception as e:  # noqa: BLE001 - best effort: the cleanup goes on and reports what it could not end
            logger.debug("could not reset the store's connections: %s", e)


def _end_stale_launchers() -> None:
    """Launcher runs a kill -9 of a whole `mlflow run` left RUNNING in Default end with their step's status."""
    try:
        ownership.end_stale_launchers(DEFAULT_EXPERIMENT_ID)
    except Exception as e:  # noqa: BLE001 - a pointer record must never stop the step
        logger.warning("could not end stale launcher runs: %s", (str(e) or repr(e)).splitlines()[0])


def _end(run: mlflow.ActiveRun, status: str, reason: str) -> None:
    """End the active run with a status and the reason as a tag; both best effort (the store may be the thing
    that failed): a run that could not be ended is named in the final message instead of claimed ended, and the
    attempt is bounded (one try per request, 10 s each) so a dead server cannot hold the exit for minutes.
    MLflow's SQL store logs each failed statement with a page of traceback: quiet here, the error says it."""
    with _quiet("mlflow.store.db.utils"), _bounded_requests():
        try:
            MlflowClient().set_tag(run.info.run_id, "finetune.end_reason", redact(reason)[:5000])
        except Exception as e:  # noqa: BLE001 - a full disk or a dead server must not hide the original error
            logger.warning("could not record why run %s ended: %s", run.info.run_id,
                           (str(e) or repr(e)).splitlines()[0])
        try:
            mlflow.end_run(status)  # pops the run first: the active-run stack is right even when this raises
        except Exception as e:  # noqa: BLE001 - the original error goes on; this run is named as not ended
            logger.warning("could not mark run %s %s: %s", run.info.run_id, status,
                           (str(e) or repr(e)).splitlines()[0][:300])
            UNENDED_RUNS.append(run.info.run_id)


# While ending runs after a failure: MLflow's defaults retry a dead server for minutes per request.
_CLEANUP_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _bounded_requests() -> Iterator[None]:
    """MLflow's HTTP retry settings cut for the block, unless the user set them."""
    chosen = {k: v for k, v in _CLEANUP_REQUESTS.items() if k not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for key in chosen:
            os.environ.pop(key, None)


def quiet_store_log() -> contextlib.AbstractContextManager:
    """MLflow's SQL store's per-statement tracebacks silenced (the caller reports the failure once)."""
    return _quiet("mlflow.store.db.utils")


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    noisy = logging.getLogger(logger_name)
    level = noisy.level
    noisy.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        noisy.setLevel(level)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (query string dropped), None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def schema_lock() -> Iterator[None]:
    """Hold a file lock beside a SQLite store's database while the first call creates its tables: entry points
    starting together on a fresh database (two sweeps, a sweep's children) would otherwise all run MLflow's schema
    creation at once, and all but one fail. Other stores are left to their server (no lock)."""
    path = sqlite_path(mlflow.get_tracking_uri())
    if path is None or not path.parent.is_dir():
        yield
        return
    with open(path.with_name(path.name + ".schema-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def use_experiment(name: str) -> None:
    """Send this process's runs to the experiment its config names (created on first use). MLflow's own choice
    wins: `--experiment-name`/`--experiment-id`, `MLFLOW_EXPERIMENT_NAME`/`_ID`, or a run given with `--run-id`.
    Under a plain `mlflow run`, which has already opened a run in the Default experiment, that run is kept as a
    launcher record pointing at the step's run, and the step's run goes to the named experiment."""
    if not name or os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher:
        run = MlflowClient().get_run(launcher)
        if run.info.experiment_id != DEFAULT_EXPERIMENT_ID or run.data.tags.get("finetune.step"):
            return  # chosen by the user (--experiment-name, --run-id of one of our runs)
        experiment_id = mlflow.set_experiment(name).experiment_id
        del os.environ["MLFLOW_RUN_ID"]
        _LAUNCHER.append(launcher)
        MlflowClient().set_tag(launcher, ownership.LAUNCHED_INTO_TAG, name)
        ownership.mark_owner(launcher)
        MlflowClient().set_tag(launcher, "mlflow.note.content",
                               f"`mlflow run` opened this run here; the step ran in experiment {name!r} "
                               f"(id {experiment_id}). Pass --experiment-name to choose another.")
        return
    if not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(name)


def log_json(payload: object, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(payload, indent=2, sort_keys=True, default=str), artifact_file)

"""Reading tune runs out of MLflow into `RunRecord`s: by experiment, by run ids, or as a parent's children.

Only finished runs of a tuning job count: `finetune.step=tune`, or a `sync` run that imported one job (it carries
`finetune.job_id`), status FINISHED and an `eval_f1`. Everything else is counted under the reason it was skipped,
so the report can say what it left out. The base model's scores live on its evaluation run
(`finetune.base_eval_run_id`): a record reads them from there as `base_eval_*` / `base_latency_ms_*`.
"""

from __future__ import annotations

import collections
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow.errors import ConfigError
from finetune_mlflow.report.runs import CURVE_KEYS, Curve, RunRecord
from finetune_mlflow.summary import base_scores
from finetune_mlflow.tracking import quote

STEP_TAG = "finetune.step"
JOB_ID_TAG = "finetune.job_id"
BASE_RUN_TAG = "finetune.base_eval_run_id"
TUNE_FILTER = f"tags.`{STEP_TAG}` = 'tune'"
SYNCED_JOB_FILTER = f"tags.`{STEP_TAG}` = 'sync' and tags.`{JOB_ID_TAG}` IS NOT NULL"
# Params a synced job carries instead of tune's own (OpenAI `hp.n_epochs`, Vertex `hp.epoch_count`, ...).
SETTING_PARAMS = {"epochs": ("epochs", "hp.n_epochs", "hp.epoch_count"),
                  "learning_rate": ("learning_rate", "hp.learning_rate_multiplier"),
                  "batch_size": ("batch_size", "hp.batch_size")}
SEARCH_PAGE = 1000
# get_metric_history has no multi-run form in the client API: against a tracking server, overlap the round trips
# (48 histories over loopback HTTP, medians of 5: 4.0 -> 2.1 s and 5.0 -> 3.6 s in two runs of
# benchmarks/bench_report_curves.py); on SQLite threads made no consistent difference, so none there.
HISTORY_THREADS = 8
REMOTE_SCHEMES = ("http", "https", "databricks")


@dataclass(frozen=True)
class Collected:
    records: list[RunRecord]
    skipped: dict[str, int]


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=SEARCH_PAGE, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def skip_reason(run: Run) -> str | None:
    """Why a run is not in the report, or None when it is a finished, evaluated tuning run."""
    tags = run.data.tags
    step = tags.get(STEP_TAG)
    if step != "tune" and not (step == "sync" and tags.get(JOB_ID_TAG)):
        return f"not a tune run (finetune.step={step or 'unset'})"
    if run.info.status != "FINISHED":
        return f"{run.info.status}"
    if "eval_f1" not in run.data.metrics:
        return "finished without eval_f1 (job not done at sync, or evaluation missing)"
    return None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:  # "auto" and the like: the provider chose it
        return None


def to_record(run: Run, curves: dict[str, Curve], base: dict[str, float] | None = None) -> RunRecord:
    """`base`: the base evaluation's metrics as `base_*` (a run that logged its own `base_*`, as older runs did,
    keeps them)."""
    params, tags = run.data.params, run.data.tags
    provider = params.get("provider") or tags.get("finetune.provider", "")
    settings = {name: next((_number(params[key]) for key in keys if key in params), None)
                for name, keys in SETTING_PARAMS.items()}
    mapped = {key for keys in SETTING_PARAMS.values() for key in keys}
    knobs = {key: value for key, value in params.items()
             if key not in mapped and (key.startswith(f"{provider}.") or key.startswith("hp."))}
    return RunRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", provider=provider,
                     base_model=params.get("base_model") or tags.get("finetune.base_model", ""),
                     metrics={**(base or {}), **run.data.metrics}, curves=curves, knobs=knobs, **settings)


def _history(client: MlflowClient, run_id: str, key: str) -> tuple[str, str, Curve]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    latest = {m.step: m.value for m in points}  # a step logged twice keeps its last value
    return run_id, key, Curve(tuple(latest), tuple(latest.values()))


def _curves(client: MlflowClient, runs: list[Run]) -> dict[str, dict[str, Curve]]:
    wanted = [(run.info.run_id, key) for run in runs for key in CURVE_KEYS if key in run.data.metrics]
    curves: dict[str, dict[str, Curve]] = {run.info.run_id: {} for run in runs}
    remote = urllib.parse.urlparse(client.tracking_uri).scheme in REMOTE_SCHEMES
    with ThreadPoolExecutor(max_workers=HISTORY_THREADS if remote else 1) as pool:
        for run_id, key, curve in pool.map(lambda pair: _history(client, *pair), wanted):
            curves[run_id][key] = curve
    return curves


def _base_metrics(client: MlflowClient, runs: list[Run]) -> dict[str, dict[str, float]]:
    """Base evaluation run id -> its scores as `base_*`, one read per distinct base run (a sweep shares one); a
    base run deleted since is left out (the report then shows no base for those runs)."""
    found = {}
    for base_id in dict.fromkeys(run.data.tags[BASE_RUN_TAG] for run in runs if run.data.tags.get(BASE_RUN_TAG)):
        try:
            found[base_id] = base_scores(client.get_run(base_id).data.metrics)
        except MlflowException:
            continue
    return found


def _collect(client: MlflowClient, runs: list[Run]) -> Collected:
    reasons = {run.info.run_id: skip_reason(run) for run in runs}
    kept = [run for run in runs if reasons[run.info.run_id] is None]
    curves = _curves(client, kept)
    bases = _base_metrics(client, kept)
    skipped = collections.Counter(reason for reason in reasons.values() if reason is not None)
    return Collected([to_record(run, curves[run.info.run_id], bases.get(run.data.tags.get(BASE_RUN_TAG, "")))
                      for run in kept], dict(skipped))


def from_experiment(name: str, client: MlflowClient | None = None) -> Collected:
    """Every tuning run of the experiment (tune runs and jobs imported by sync)."""
    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ConfigError(f"--experiment {name!r}: no such MLflow experiment in {client.tracking_uri} "
                          f"(experiments there: {known})")
    ids = [experiment.experiment_id]
    runs = _search(client, ids, TUNE_FILTER) + _search(client, ids, SYNCED_JOB_FILTER)
    return _collect(client, sorted(runs, key=lambda run: run.info.start_time))


def from_run_ids(run_ids: list[str], client: MlflowClient | None = None) -> Collected:
    """The given runs, in any experiments, fetched with one search."""
    client = client or MlflowClient()
    wanted = list(dict.fromkeys(run_id.strip() for run_id in run_ids if run_id.strip()))
    if not wanted:
        raise ConfigError("--runs: no run id given (expected ID,ID,...)")
    experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    found = _search(client, experiment_ids, f"attributes.run_id IN ({', '.join(map(quote, wanted))})")
    missing = sorted(set(wanted) - {run.info.run_id for run in found})
    if missing:
        raise ConfigError(f"--runs: no such run in {client.tracking_uri}: {', '.join(missing)}")
    order = {run_id: i for i, run_id in enumerate(wanted)}
    return _collect(client, sorted(found, key=lambda run: order[run.info.run_id]))


def from_parent(parent_run_id: str, client: MlflowClient | None = None) -> Collected:
    """The direct children of a sweep or main run that are tuning runs."""
    client = client or MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as e:
        raise ConfigError(f"--parent {parent_run_id!r}: no such run in {client.tracking_uri} ({e.error_code})") from e
    children = _search(client, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = {quote(parent_run_id)}")
    return _collect(client, children)

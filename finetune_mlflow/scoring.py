"""Evaluation runs: score a model on the prepared validation split inside an MLflow run, log the metrics and the
per-example table, reuse a base evaluation made on the same data by the same code, and resolve model references
(`base`, `models:/...`, `runs:/...`, a provider model id). Used by `evaluate`, `tune`, `sync` and `promote`.

Metrics: `eval_exact_match`, `eval_f1` (0-100) with `_ci_low`/`_ci_high` (95% bootstrap), `eval_n`,
`eval_error_count`, `eval_throughput_rps`, `latency_ms_{mean,p50,p90,p95,p99,max}`, `eval_retry_wait_ms_total`,
`eval_input_tokens`/`eval_output_tokens` where the provider reports usage, and against a baseline
`eval_f1_delta` (and exact match) with a paired-bootstrap interval. Artifact: `eval_results.json` (per-example
table: id, question, prediction, gold answers, em, f1, latency_ms, error).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from mlflow.exceptions import MlflowException

from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError, FinetuneError
from finetune_mlflow.evaluation import (
    EvaluationRun,
    ExampleResult,
    check_error_rate,
    delta_against,
    result_rows,
    run_batched_predictions,
    run_predictions,
    summarize,
)
from finetune_mlflow.lifecycle_record import warn_if_retiring
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import Provider
from finetune_mlflow.preparation import Prepared
from finetune_mlflow.run_cost import check_eval_cost
from finetune_mlflow.scratch import download_artifacts, scratch_dir
from finetune_mlflow.served import load_version
from finetune_mlflow.traces import record_traces
from finetune_mlflow.tracking import code_version, find_finished_run, log_values, step_run

logger = logging.getLogger(__name__)

RESULTS_TABLE = "eval_results.json"


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    metrics: dict[str, float]
    rows: list[ExampleResult]
    model_version: str = ""  # `<name>/<version>` when a registered version was scored


def score_model(provider: Provider, model_id: str, examples: list[dict], config: Config,
                baseline: list[ExampleResult] | None = None) -> tuple[EvaluationRun, dict[str, float]]:
    """Predict every example and summarize (with the paired delta against `baseline` when given); logs nothing.
    Refused before the first request when its cost bound exceeds `evaluate.max_cost_usd`."""
    check_eval_cost(examples, [model_id], config, provider.name)
    if provider.batched_prediction:
        run = run_batched_predictions(lambda pairs: provider.predict_batch(model_id, pairs), examples)
    else:
        run = run_predictions(lambda question, context: provider.predict(model_id, question, context), examples,
                              min(config.evaluate.max_concurrency, provider.max_concurrency))
    metrics = summarize(run, bootstrap_samples=config.evaluate.bootstrap_samples, seed=config.evaluate.bootstrap_seed)
    if baseline:
        metrics.update(delta_against(run.results, baseline, bootstrap_samples=config.evaluate.bootstrap_samples,
                                     seed=config.evaluate.bootstrap_seed))
    return run, metrics


def evaluate_and_log(provider: Provider, model_id: str, examples: list[dict], config: Config,
                     baseline: list[ExampleResult] | None = None, *, linked_model_id: str | None = None,
                     trace_tags: dict[str, str] | None = None) -> Evaluation:
    """Evaluate in the active run: metrics (linked to the MLflow LoggedModel `linked_model_id` when given, so
    the model's page shows them), per-example table, traces (tagged with `trace_tags`), and the delta against a
    baseline if given."""
    run, metrics = score_model(provider, model_id, examples, config, baseline)
    active = mlflow.active_run()
    log_values(MlflowClient(), active.info.run_id, metrics=metrics, tags=provider.request_tags(model_id),
               model_id=linked_model_id)
    columns = result_rows(run.results)
    if columns:
        log_results_table(active.info.run_id, columns)
    if config.evaluate.trace_samples:
        record_traces(run.results, {e["id"]: e["context"] for e in examples}, model=model_id, provider=provider.name,
                      experiment_id=active.info.experiment_id, run_id=active.info.run_id,
                      size=config.evaluate.trace_samples, tags=trace_tags)
    check_error_rate(run, config.evaluate.max_error_rate)
    return Evaluation(active.info.run_id, metrics, run.results)


def log_results_table(run_id: str, columns: dict[str, list[Any]], artifact_file: str = RESULTS_TABLE) -> None:
    """A table artifact (the per-example table by default), replacing an earlier attempt's: `log_table` would
    append to it (and round-trip the old rows through pandas, turning an id such as "0003" into 3)."""
    if artifact_file not in {a.path for a in MlflowClient().list_artifacts(run_id)}:
        mlflow.log_table(columns, artifact_file)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / artifact_file
        pd.DataFrame(columns).to_json(path, orient="split", index=False, date_format="iso")
        mlflow.log_artifact(str(path))


def load_rows(run_id: str) -> list[ExampleResult]:
    """The per-example rows a run logged, read as plain JSON so ids keep their exact strings ("0003" stays
    "0003"; pandas would make it 3); should a table hold an id twice, its last row wins."""
    table = json.loads(download_artifacts(run_id=run_id, artifact_path=RESULTS_TABLE).read_text(encoding="utf-8"))
    latest = {}
    for values in table["data"]:
        row = ExampleResult.from_row(dict(zip(table["columns"], values)))
        latest[row.id] = row
    return list(latest.values())


def base_evaluation_keys(config: Config, provider: Provider, base_model: str, data_sha256: str) -> dict[str, str]:
    """What makes two base evaluations interchangeable: same model, data, evaluation settings and code (the
    prompt lives in the code)."""
    return {"model_ref": "base", "provider": provider.name, "base_model": base_model, "data_sha256": data_sha256,
            "eval_config_sha256": config.sha256("evaluate"), "code_version": code_version()}


def base_evaluation(config: Config, prepared: Prepared, provider: Provider) -> Evaluation:
    """The provider's base model on this data, computed once per `base_evaluation_keys` and reused."""
    keys = base_evaluation_keys(config, provider, config.tune.base_model, prepared.data_sha256)
    previous = find_finished_run(mlflow.active_run().info.experiment_id, step="evaluate", **keys)
    if previous is not None:
        logger.info("reusing base evaluation run %s", previous.info.run_id)
        return Evaluation(previous.info.run_id, dict(previous.data.metrics), load_rows(previous.info.run_id))
    with step_run("evaluate", run_name=f"evaluate-base-{provider.name}",
                  tags={f"finetune.{k}": v for k, v in keys.items()}):
        return evaluate_and_log(provider, config.tune.base_model, prepared.split("validation"), config)


@dataclass(frozen=True)
class ResolvedModel:
    provider: Provider
    model_id: str
    base_model: str
    version: str = ""  # `<name>/<version>` a `models:/` reference (an alias included) stood for


def _registered_version(name_and_version: str) -> ModelVersion:
    """The version `<name>/<version>` or `<name>@<alias>` names (an alias resolved now, as the load will)."""
    client = MlflowClient()
    if "@" in name_and_version:
        name, alias = name_and_version.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = name_and_version.rpartition("/")
    if not name or not version:
        raise ConfigError(f"model 'models:/{name_and_version}': expected models:/<name>/<version> or "
                          "models:/<name>@<alias>")
    return client.get_model_version(name, version)


def resolve_model(reference: str, config: Config) -> ResolvedModel:
    """`base`, `models:/...`, `runs:/<id>` or a provider model id -> the provider and model id to call; a reference
    that names nothing usable is a ConfigError saying what was looked for, before any run is opened."""
    if reference == "base":
        return ResolvedModel(get_provider(config.tune.provider, config), config.tune.base_model,
                             config.tune.base_model)
    if not reference.startswith(("runs:/", "models:/")):
        # A provider's own model id, e.g. an existing `ft:gpt-4o-mini-...` model or a Vertex endpoint.
        provider = get_provider(config.tune.provider, config)
        provider.check_model(reference)
        return ResolvedModel(provider, reference, config.tune.base_model)
    try:
        return _resolve_logged(reference, config)
    except FinetuneError:
        raise
    except (MlflowException, OSError, ValueError, KeyError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"model {reference[:200]!r} cannot be resolved: {detail}; expected "
                          "models:/<name>/<version>, models:/<name>@<alias> or runs:/<id of a run that logged a "
                          "model>") from e


def _resolve_logged(reference: str, config: Config) -> ResolvedModel:
    if reference.startswith("runs:/"):
        run_id = reference[len("runs:/"):].split("/")[0]
        if not run_id:
            raise ConfigError(f"model {reference!r}: no run id after runs:/")
        reference = f"runs:/{run_id}/model"
        tags = MlflowClient().get_run(run_id).data.tags
        base_model = tags.get("finetune.base_model", "")
    else:
        version = _registered_version(reference[len("models:/"):])
        # Load that exact version: an alias moved between this lookup and the download must not mix two versions.
        exact = f"models:/{version.name}/{version.version}"
        warn_if_retiring(exact, dict(version.tags), config.lifecycle.warn_days)
        model_id, provider = _load_logged_model(exact, config)
        return ResolvedModel(provider, model_id, version.tags.get("base_model", ""),
                             f"{version.name}/{version.version}")
    warn_if_retiring(reference, tags, config.lifecycle.warn_days)
    model_id, provider = _load_logged_model(reference, config)
    return ResolvedModel(provider, model_id, base_model)


def _load_logged_model(reference: str, config: Config) -> tuple[str, Provider]:
    """(model id, provider) of a logged pyfunc, from the files it ships (no pyfunc load: see `served`); the
    user's config decides where credentials go."""
    loaded = load_version(reference, scratch_dir("model"), config)
    if loaded is not None:
        return loaded
    # A version logged before `serving.json`: only its pyfunc knows the provider. suppress_warnings: no check of
    # its pinned requirements against this environment; evaluation calls the provider, not the served package.
    python_model = mlflow.pyfunc.load_model(reference, dst_path=str(scratch_dir("model")),
                                            suppress_warnings=True).unwrap_python_model()
    return python_model.model_id, python_model.provider

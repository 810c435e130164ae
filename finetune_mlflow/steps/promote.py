"""promote: move the `champion` alias only when the evidence says the candidate is better; record every decision.

Parameters in: `config`, `model_name` (default `tune.registered_model_name`), `version` (default: the newest),
`force` + `reason` (override the gates, reason required), `rollback` (champion <- previous_champion).
Compares the candidate with the current champion on the same validation questions, from the per-example tables
their runs already logged (re-evaluating only a side whose table is missing or on other data). Gates from the
`promotion:` config block. On success `champion` -> candidate and `previous_champion` -> old champion; otherwise
the candidate becomes `challenger`. Logged on the promote run: params (gates, candidate, champion), metrics
(`f1_delta`, `f1_delta_ci_low/high`, candidate and champion F1), tags `promotion.decision`/`promotion.reason`,
and `promotion_report.md`. The candidate version gets a `promotion.decision` tag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError, FinetuneError
from finetune_mlflow.evaluation import run_predictions, summarize
from finetune_mlflow.promotion import Decision, Evidence, decide
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.scratch import download_artifacts
from finetune_mlflow.stats import paired_bootstrap_delta
from finetune_mlflow.steps.evaluate import RESULTS_TABLE, load_rows, resolve_model
from finetune_mlflow.steps.prepare import PREPARED
from finetune_mlflow.tracking import log_values, step_run

logger = logging.getLogger(__name__)

PREVIOUS = "previous_champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class PromoteResult:
    run_id: str
    decision: Decision
    candidate: str
    champion_before: str | None
    champion_after: str | None


def _alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _candidate(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        if version:
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1)
    except MlflowException as e:
        raise ConfigError(f"registered model {name!r} version {version or '(newest)'} not found: {e.message}") from e
    if not versions:
        raise ConfigError(f"registered model {name!r} has no versions; run tune first")
    return versions[0]


def _validation_examples(run_id: str) -> tuple[str, list[dict]]:
    """(data fingerprint, validation examples) of the data a tune run was evaluated on."""
    tags = MlflowClient().get_run(run_id).data.tags
    prepare_run = tags.get("finetune.prepare_run_id")
    if not prepare_run:
        raise FinetuneError(f"run {run_id} records no prepare run, so its validation data is unknown")
    local = download_artifacts(run_id=prepare_run, artifact_path=f"{PREPARED}/validation.jsonl")
    return tags.get("finetune.data_sha256", ""), read_jsonl(local)


def _rows(version: ModelVersion, name: str, data_sha256: str, examples: list[dict], config: Config
          ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-example rows and summary metrics of a version on the given data, reusing its run's table if it fits."""
    run = MlflowClient().get_run(version.run_id) if version.run_id else None
    if run is not None and run.data.tags.get("finetune.data_sha256") == data_sha256:
        if RESULTS_TABLE in {a.path for a in MlflowClient().list_artifacts(version.run_id)}:
            return load_rows(version.run_id), dict(run.data.metrics)
        logger.info("version %s has no per-example table; evaluating it", version.version)
    logger.info("evaluating %s version %s on the candidate's validation data", name, version.version)
    resolved = resolve_model(f"models:/{name}/{version.version}", config)
    evaluated = run_predictions(lambda q, c: resolved.provider.predict(resolved.model_id, q, c), examples,
                                min(config.evaluate.max_concurrency, resolved.provider.max_concurrency))
    metrics = summarize(evaluated, bootstrap_samples=config.evaluate.bootstrap_samples,
                        seed=config.evaluate.bootstrap_seed)
    rows = [{"id": r.id, "f1": r.f1, "em": r.em, "error": r.error} for r in evaluated.results]
    return rows, metrics


def _failed(row: dict[str, Any]) -> bool:
    """A row's error as read back from a logged table is NaN when there was none."""
    return isinstance(row.get("error"), str) and bool(row["error"])


def _error_rate(rows: list[dict[str, Any]]) -> float:
    return sum(1 for r in rows if _failed(r)) / len(rows) if rows else 1.0


def _report(name: str, candidate: str, champion: str | None, evidence: Evidence, decision: Decision,
            config: Config, forced: str) -> str:
    lines = [f"# Promotion of {name} version {candidate}", "",
             f"- decision: **{'promote' if decision.promote else 'keep champion'}**",
             f"- reason: {decision.reason}", f"- champion before: {champion or 'none'}",
             f"- candidate F1: {evidence.candidate_f1:.2f}, error rate {evidence.candidate_error_rate:.2%}, "
             f"latency p95 {evidence.candidate_latency_ms_p95} ms"]
    if evidence.champion_f1 is not None:
        lines.append(f"- champion F1: {evidence.champion_f1:.2f}; delta {evidence.f1_delta:+.2f} "
                     f"(95% paired bootstrap CI {evidence.f1_delta_ci_low:+.2f} to {evidence.f1_delta_ci_high:+.2f})")
    lines.append(f"- gates: min_f1_gain {config.promotion.min_f1_gain}, max_latency_ms_p95 "
                 f"{config.promotion.max_latency_ms_p95 or 'off'}, max_error_rate {config.promotion.max_error_rate}")
    if forced:
        lines.append(f"- forced by the operator: {forced}")
    return "\n".join(lines) + "\n"


def _move_aliases(client: MlflowClient, name: str, alias: str, candidate: str, expected_champion: str | None) -> None:
    """Re-check the champion just before moving it, so two concurrent promotions cannot interleave silently."""
    current = _alias_version(client, name, alias)
    if (str(current.version) if current else None) != expected_champion:
        raise FinetuneError(f"{name}@{alias} changed to {current.version if current else None} during this "
                            f"promotion (expected {expected_champion}); rerun promote to decide again")
    if expected_champion:
        client.set_registered_model_alias(name, PREVIOUS, expected_champion)
    client.set_registered_model_alias(name, alias, candidate)
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == candidate:
        client.delete_registered_model_alias(name, CHALLENGER)


def run_rollback(config: Config, model_name: str) -> PromoteResult:
    name = model_name or config.tune.registered_model_name
    alias = config.promotion.alias
    client = MlflowClient()
    with step_run("promote", run_name="rollback", tags={"promotion.model": name}) as run:
        previous = _alias_version(client, name, PREVIOUS)
        current = _alias_version(client, name, alias)
        if previous is None:
            raise FinetuneError(f"{name} has no {PREVIOUS} alias: nothing to roll back to")
        before, after = (str(current.version) if current else None), str(previous.version)
        client.set_registered_model_alias(name, alias, after)
        if before is not None:
            client.set_registered_model_alias(name, PREVIOUS, before)
        reason = f"rollback: {alias} {before} -> {after}"
        log_values(client, run.info.run_id, tags={"promotion.decision": "rollback", "promotion.reason": reason})
        print(f"{name}: {reason}")
        return PromoteResult(run.info.run_id, Decision(True, reason), after, before, after)


def run_promote(config: Config, *, model_name: str = "", version: str = "", force: bool = False,
                reason: str = "") -> PromoteResult:
    if force and not reason.strip():
        raise ConfigError("force=true needs a reason: pass -P reason='why the gates are overridden'")
    name = model_name or config.tune.registered_model_name
    alias = config.promotion.alias
    client = MlflowClient()
    candidate = _candidate(client, name, version)
    candidate_version = str(candidate.version)
    with step_run("promote", run_name=f"promote-{name}-v{candidate_version}",
                  tags={"promotion.model": name, "promotion.candidate": candidate_version}) as run:
        champion = _alias_version(client, name, alias)
        champion_version = str(champion.version) if champion else None
        if champion_version == candidate_version:
            decision = Decision(False, f"version {candidate_version} is already {alias}")
        else:
            data_sha256, examples = _validation_examples(candidate.run_id)
            candidate_rows, candidate_metrics = _rows(candidate, name, data_sha256, examples, config)
            evidence = Evidence(
                candidate_f1=100.0 * sum(float(r["f1"]) for r in candidate_rows) / max(len(candidate_rows), 1),
                candidate_error_rate=_error_rate(candidate_rows),
                candidate_latency_ms_p95=candidate_metrics.get("latency_ms_p95"),
            )
            if champion is not None:
                champion_rows, _ = _rows(champion, name, data_sha256, examples, config)
                by_id = {r["id"]: float(r["f1"]) for r in champion_rows}
                shared = [r for r in candidate_rows if r["id"] in by_id]
                delta = paired_bootstrap_delta([100.0 * float(r["f1"]) for r in shared],
                                               [100.0 * by_id[r["id"]] for r in shared],
                                               samples=config.evaluate.bootstrap_samples,
                                               seed=config.evaluate.bootstrap_seed)
                evidence = Evidence(evidence.candidate_f1, evidence.candidate_error_rate,
                                    evidence.candidate_latency_ms_p95,
                                    champion_f1=100.0 * sum(by_id.values()) / max(len(by_id), 1),
                                    f1_delta=delta.estimate, f1_delta_ci_low=delta.low, f1_delta_ci_high=delta.high)
            decision = decide(evidence, config.promotion)
            if force and not decision.promote:
                decision = Decision(True, f"forced ({reason}); gates said: {decision.reason}", decision.checks)
            metrics = {k: v for k, v in (("candidate_f1", evidence.candidate_f1),
                                         ("candidate_error_rate", evidence.candidate_error_rate),
                                         ("candidate_latency_ms_p95", evidence.candidate_latency_ms_p95),
                                         ("champion_f1", evidence.champion_f1), ("f1_delta", evidence.f1_delta),
                                         ("f1_delta_ci_low", evidence.f1_delta_ci_low),
                                         ("f1_delta_ci_high", evidence.f1_delta_ci_high)) if v is not None}
            log_values(client, run.info.run_id, metrics=metrics, params={
                "min_f1_gain": config.promotion.min_f1_gain,
                "max_latency_ms_p95": config.promotion.max_latency_ms_p95,
                "max_error_rate": config.promotion.max_error_rate, "candidate_version": candidate_version,
                "champion_version": champion_version or "none", "forced": force})
            mlflow.log_text(_report(name, candidate_version, champion_version, evidence,
                                    decision, config, reason if force else ""), "promotion_report.md")
            if decision.promote:
                _move_aliases(client, name, alias, candidate_version, champion_version)
            else:
                client.set_registered_model_alias(name, CHALLENGER, candidate_version)
            client.set_model_version_tag(name, candidate_version, "promotion.decision",
                                         "promoted" if decision.promote else "rejected")
        log_values(client, run.info.run_id, tags={"promotion.decision": "promote" if decision.promote else "keep",
                                                  "promotion.reason": decision.reason[:5000]})
        after = _alias_version(client, name, alias)
        print(f"{name} v{candidate_version}: {'promoted to' if decision.promote else 'not promoted to'} {alias} "
              f"- {decision.reason}")
        return PromoteResult(run.info.run_id, decision, candidate_version, champion_version,
                             str(after.version) if after else None)

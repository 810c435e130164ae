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

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError, FinetuneError
from finetune_mlflow.evaluation import ExampleResult, delta_against, error_rate
from finetune_mlflow.promotion import BASE_REFERENCE, Decision, Evidence, decide
from finetune_mlflow.promotion_lifecycle import lifecycle_gate
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.preparation import PREPARED
from finetune_mlflow.scoring import RESULTS_TABLE, load_rows, resolve_model, score_model
from finetune_mlflow.scratch import download_artifacts
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
          ) -> tuple[list[ExampleResult], dict[str, float]]:
    """Per-example rows and summary metrics of a version on the given data, reusing its run's table if it fits."""
    run = MlflowClient().get_run(version.run_id) if version.run_id else None
    if run is not None and run.data.tags.get("finetune.data_sha256") == data_sha256:
        if RESULTS_TABLE in {a.path for a in MlflowClient().list_artifacts(version.run_id)}:
            return load_rows(version.run_id), dict(run.data.metrics)
        logger.info("version %s has no per-example table; evaluating it", version.version)
    logger.info("evaluating %s version %s on the candidate's validation data", name, version.version)
    resolved = resolve_model(f"models:/{name}/{version.version}", config)
    evaluated, metrics = score_model(resolved.provider, resolved.model_id, examples, config)
    return evaluated.results, metrics


def _base_rows(candidate: ModelVersion) -> list[ExampleResult]:
    """The base model's rows on the candidate's data (its tune run's base evaluation), empty if unknown."""
    base_run = MlflowClient().get_run(candidate.run_id).data.tags.get("finetune.base_eval_run_id") \
        if candidate.run_id else None
    return load_rows(base_run) if base_run else []


def _evidence(candidate_rows: list[ExampleResult], metrics: dict[str, float], reference: list[ExampleResult],
              reference_name: str, config: Config) -> Evidence:
    """The candidate against the reference (the champion, else the base model) on the same questions."""
    delta = delta_against(candidate_rows, reference, bootstrap_samples=config.evaluate.bootstrap_samples,
                          seed=config.evaluate.bootstrap_seed, prefix="")
    shared = {r.id for r in candidate_rows} & {r.id for r in reference}
    reference_f1 = 100.0 * sum(r.f1 for r in reference if r.id in shared) / len(shared) if shared else None
    return Evidence(
        candidate_f1=100.0 * sum(r.f1 for r in candidate_rows) / max(len(candidate_rows), 1),
        candidate_error_rate=error_rate(candidate_rows), candidate_latency_ms_p95=metrics.get("latency_ms_p95"),
        reference=reference_name if shared else None, reference_f1=reference_f1, f1_delta=delta.get("f1_delta"),
        f1_delta_ci_low=delta.get("f1_delta_ci_low"), f1_delta_ci_high=delta.get("f1_delta_ci_high"))


def _report(name: str, candidate: str, champion: str | None, evidence: Evidence, decision: Decision,
            config: Config, forced: str) -> str:
    lines = [f"# Promotion of {name} version {candidate}", "",
             f"- decision: **{'promote' if decision.promote else 'keep champion'}**",
             f"- reason: {decision.reason}", f"- champion before: {champion or 'none'}",
             f"- candidate F1: {evidence.candidate_f1:.2f}, error rate {evidence.candidate_error_rate:.2%}, "
             f"latency p95 {evidence.candidate_latency_ms_p95} ms"]
    if evidence.reference_f1 is not None:
        lines.append(f"- {evidence.reference} F1: {evidence.reference_f1:.2f}; delta {evidence.f1_delta:+.2f} "
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


def _gather_evidence(candidate: ModelVersion, champion: ModelVersion | None, name: str, config: Config) -> Evidence:
    """The candidate against the champion, or against the base model when there is no champion (nothing worse
    than the base model is promoted), on the candidate's validation questions."""
    data_sha256, examples = _validation_examples(candidate.run_id)
    candidate_rows, candidate_metrics = _rows(candidate, name, data_sha256, examples, config)
    if champion is not None:
        reference = _rows(champion, name, data_sha256, examples, config)[0]
        return _evidence(candidate_rows, candidate_metrics, reference, f"champion v{champion.version}", config)
    return _evidence(candidate_rows, candidate_metrics, _base_rows(candidate), BASE_REFERENCE, config)


def _log_evidence(run_id: str, evidence: Evidence, config: Config, candidate: str, champion: str | None,
                  forced: bool) -> None:
    values = {"candidate_f1": evidence.candidate_f1, "candidate_error_rate": evidence.candidate_error_rate,
              "candidate_latency_ms_p95": evidence.candidate_latency_ms_p95, "reference_f1": evidence.reference_f1,
              "f1_delta": evidence.f1_delta, "f1_delta_ci_low": evidence.f1_delta_ci_low,
              "f1_delta_ci_high": evidence.f1_delta_ci_high}
    log_values(MlflowClient(), run_id, metrics={k: round(v, 4) for k, v in values.items() if v is not None}, params={
        "min_f1_gain": config.promotion.min_f1_gain, "max_latency_ms_p95": config.promotion.max_latency_ms_p95,
        "max_error_rate": config.promotion.max_error_rate, "candidate_version": candidate,
        "champion_version": champion or "none", "reference": evidence.reference or "none", "forced": forced})


def _apply(client: MlflowClient, name: str, alias: str, candidate: str, champion: str | None,
           decision: Decision) -> None:
    if decision.promote:
        _move_aliases(client, name, alias, candidate, champion)
    else:
        client.set_registered_model_alias(name, CHALLENGER, candidate)
    client.set_model_version_tag(name, candidate, "promotion.decision", "promoted" if decision.promote else "rejected")


def run_promote(config: Config, *, model_name: str = "", version: str = "", force: bool = False,
                reason: str = "") -> PromoteResult:
    if force and not reason.strip():
        raise ConfigError("force=true needs a reason: pass -P reason='why the gates are overridden'")
    name = model_name or config.tune.registered_model_name
    alias = config.promotion.alias
    client = MlflowClient()
    candidate = _candidate(client, name, version)
    candidate_version = str(candidate.version)
    with step_run("promote", run_name=f"promote {name} v{candidate_version}",
                  tags={"promotion.model": name, "promotion.candidate": candidate_version}) as run:
        champion = _alias_version(client, name, alias)
        champion_version = str(champion.version) if champion else None
        if champion_version == candidate_version:
            decision = Decision(False, f"version {candidate_version} is already {alias}")
        else:
            evidence = _gather_evidence(candidate, champion, name, config)
            decision = lifecycle_gate(decide(evidence, config.promotion), candidate_version, candidate.tags,
                                      champion_version, champion.tags if champion else None, config)
            if force and not decision.promote:
                decision = Decision(True, f"forced ({reason}); gates said: {decision.reason}", decision.checks)
            _log_evidence(run.info.run_id, evidence, config, candidate_version, champion_version, force)
            mlflow.log_text(_report(name, candidate_version, champion_version, evidence,
                                    decision, config, reason if force else ""), "promotion_report.md")
            _apply(client, name, alias, candidate_version, champion_version, decision)
        log_values(client, run.info.run_id, tags={"promotion.decision": "promote" if decision.promote else "keep",
                                                  "promotion.reason": decision.reason[:5000],
                                                  "mlflow.note.content": decision.reason[:5000]})
        after = _alias_version(client, name, alias)
        print(f"{name} v{candidate_version}: {'promoted to' if decision.promote else 'not promoted to'} {alias} "
              f"- {decision.reason}")
        return PromoteResult(run.info.run_id, decision, candidate_version, champion_version,
                             str(after.version) if after else None)

"""promote: move the `champion` alias only when the evidence says the candidate is better; record every decision.

Parameters in: `config`, `model_name` (default `tune.registered_model_name`), `version` (default: the newest),
`force` + `reason` (override the gates, reason required), `rollback` (champion <- previous_champion).
Compares the candidate with the current champion (or, with none, the base model: the same gates either way) on the
same validation questions, from the per-example tables their runs already logged (re-evaluating only a side whose
table is missing or on other data). Gates from the `promotion:` config block. A candidate whose files do not load
is refused before any alias moves. Aliases move under the model's promotion lock (`promotion_lock`), after the
champion is read again: a promote whose champion changed meanwhile moved nothing, says so and exits 2. On success
`champion` -> candidate and `previous_champion` -> old champion; a rejected candidate becomes `challenger` when it
is the newest rejected version. Logged on the promote run: params (gates, candidate, champion), metrics
(`f1_delta`, `f1_delta_ci_low/high`, candidate and champion F1), tags `promotion.decision`/`promotion.reason`,
and `promotion_report.md`. The candidate version gets the decision as `promotion.*` tags and a description
section (the gain with its interval, the gates, a link to the promote run).
"""

from __future__ import annotations

import datetime
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
from finetune_mlflow.promotion_lock import PromotionLost, promotion_lock
from finetune_mlflow.promotion_notes import version_description, version_tags
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
             f"latency p95 {_ms(evidence.candidate_latency_ms_p95)}"]
    if evidence.reference_f1 is not None:
        lines.append(f"- {evidence.reference} F1: {evidence.reference_f1:.2f}; delta {evidence.f1_delta:+.2f} "
                     f"(95% paired bootstrap CI {evidence.f1_delta_ci_low:+.2f} to {evidence.f1_delta_ci_high:+.2f})")
    lines.append(f"- gates: min_f1_gain {config.promotion.min_f1_gain}, max_latency_ms_p95 "
                 f"{config.promotion.max_latency_ms_p95 or 'off'}, max_error_rate {config.promotion.max_error_rate}")
    if forced:
        lines.append(f"- forced by the operator: {forced}")
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} ms"


def _move_aliases(client: MlflowClient, name: str, alias: str, candidate: str, expected_champion: str | None) -> None:
    """Re-check the champion just before moving it (under the promotion lock): a promotion that decided against
    another champion than the one now there lost the race, and moves nothing."""
    current = _alias_version(client, name, alias)
    if (str(current.version) if current else None) != expected_champion:
        raise PromotionLost(f"lost the race: {name}@{alias} changed to version {current.version if current else None}"
                            f" during this promotion, which compared version {candidate} with "
                            f"{'version ' + expected_champion if expected_champion else 'the base model'}; nothing "
                            "was changed: rerun promote to decide against the new champion")
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
        if previous is None:
            raise FinetuneError(f"{name} has no {PREVIOUS} alias: nothing to roll back to")
        _check_loads(name, str(previous.version))
        with promotion_lock(client, name, run.info.run_id):
            previous, current = _alias_version(client, name, PREVIOUS), _alias_version(client, name, alias)
            if previous is None:
                raise PromotionLost(f"{name}@{PREVIOUS} was removed by another promotion meanwhile; nothing changed")
            before, after = (str(current.version) if current else None), str(previous.version)
            client.set_registered_model_alias(name, alias, after)
            if before is not None:
                client.set_registered_model_alias(name, PREVIOUS, before)
            reason = f"rollback: {alias} {before} -> {after}"
            client.set_model_version_tag(name, after, "promotion.decision", "restored by rollback")
            client.set_model_version_tag(name, after, "promotion.run_id", run.info.run_id)
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


def _check_loads(name: str, version: str) -> None:
    """The version's MLmodel reads and every file its pyfunc names is in the store: a version whose artifacts were
    deleted would take the alias and then fail every load. Listed, not downloaded (a merged model is gigabytes);
    credentials are not needed (no provider is built)."""
    uri = f"models:/{name}/{version}"
    try:
        flavor = mlflow.models.Model.load(str(download_artifacts(artifact_uri=f"{uri}/MLmodel"))).flavors.get(
            "python_function", {})
        named = [entry["path"] for entry in (flavor.get("artifacts") or {}).values()]
        named += [flavor["code"]] if flavor.get("code") else []
        missing = [path for path in named if not _listed(uri, path)]
    except Exception as e:  # noqa: BLE001 - whatever stops the download or the read stops the promotion
        raise FinetuneError(f"{uri} does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "no alias was moved") from e
    if missing or not flavor:
        raise FinetuneError(f"{uri} does not load: {'missing ' + ', '.join(missing) if missing else 'no pyfunc'}; "
                            "no alias was moved")


def _listed(uri: str, path: str) -> bool:
    parent, _, leaf = path.rstrip("/").rpartition("/")
    entries = mlflow.artifacts.list_artifacts(artifact_uri=f"{uri}/{parent}" if parent else uri)
    return leaf in {entry.path.rstrip("/").rpartition("/")[2] for entry in entries}


def _newest_rejected(client: MlflowClient, name: str, candidate: str) -> bool:
    """Whether the candidate is at least as new as the current challenger (an older version re-examined and
    rejected does not take the alias from a newer one)."""
    challenger = _alias_version(client, name, CHALLENGER)
    return challenger is None or int(challenger.version) <= int(candidate)


def _apply(client: MlflowClient, name: str, alias: str, candidate: str, champion: str | None, decision: Decision,
           notes: tuple[dict[str, str], str], run_id: str) -> None:
    """Move the aliases and write the decision on the version, under the model's promotion lock."""
    if decision.promote:
        _check_loads(name, candidate)
    with promotion_lock(client, name, run_id):
        if decision.promote:
            _move_aliases(client, name, alias, candidate, champion)
        elif _newest_rejected(client, name, candidate):
            client.set_registered_model_alias(name, CHALLENGER, candidate)
        tags, description = notes
        for key, value in tags.items():
            client.set_model_version_tag(name, candidate, key, value)
        client.update_model_version(name, candidate, description=description)


def _notes(candidate: ModelVersion, evidence: Evidence, decision: Decision, config: Config, forced: bool,
           run: mlflow.ActiveRun) -> tuple[dict[str, str], str]:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    link = f"[promote run {run.info.run_id}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"
    common = dict(forced=forced, alias=config.promotion.alias, when=when)
    return (version_tags(decision, evidence, config.promotion, run_id=run.info.run_id, **common),
            version_description(candidate.description, decision, evidence, config.promotion, run_link=link,
                                **common))


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
            overridden = force and not decision.promote
            if overridden:
                decision = Decision(True, f"forced ({reason}); gates said: {decision.reason}", decision.checks)
            _log_evidence(run.info.run_id, evidence, config, candidate_version, champion_version, force)
            mlflow.log_text(_report(name, candidate_version, champion_version, evidence,
                                    decision, config, reason if force else ""), "promotion_report.md")
            _apply(client, name, alias, candidate_version, champion_version, decision,
                   _notes(candidate, evidence, decision, config, overridden, run), run.info.run_id)
        log_values(client, run.info.run_id, tags={"promotion.decision": "promote" if decision.promote else "keep",
                                                  "promotion.reason": decision.reason[:5000],
                                                  "mlflow.note.content": decision.reason[:5000]})
        after = _alias_version(client, name, alias)
        print(f"{name} v{candidate_version}: {'promoted to' if decision.promote else 'not promoted to'} {alias} "
              f"- {decision.reason}")
        return PromoteResult(run.info.run_id, decision, candidate_version, champion_version,
                             str(after.version) if after else None)

"""migrate: replace a champion whose model is retiring with the cheapest candidate that is not worse.

Parameters in: `config` with a `migration:` block (see `migration_plan`): explicit candidate settings (provider,
base model, knobs), `max_f1_loss`, optionally `prompts` and `max_agreement_loss`. For the champion of
`tune.registered_model_name` (`promotion.alias`), on its own prepared split: each candidate is tuned (nested `tune`
runs, registered under the champion's model) or reused when a finished run has the same data, tune, evaluate
and provider settings (`reuse_key`; edits to `lifecycle` or `promotion` retrain nothing); it is compared with
the champion's recorded per-question answers (the champion is never called, so this works after it shut down),
and with captured prompts for agreement with the champion's recorded answers (`capture`). The rule is in
`migration_rule`. The alias moves through `promote` (forced, with the migration's decision as the reason, which
names the retiring model and its date); the winner gets the tag `migration.replaces` = the old version, so a rerun
compares with the same retiring champion and moves nothing twice.

Logged on the `migrate` run: `migration_report.md`, the table `migration.json` (champion beside every
candidate), tags `migration.decision`, `migration.winner`, `migration.retiring_model`, `migration.shutdown_date`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from finetune_mlflow.agreement import agreement
from finetune_mlflow.config import Config, read_raw_section, with_overrides
from finetune_mlflow.costing import token_price
from finetune_mlflow.errors import ConfigError, FinetuneError
from finetune_mlflow.providers import PROVIDERS, provider_class
from finetune_mlflow.evaluation import delta_against, error_rate
from finetune_mlflow.lifecycle_facts import MODEL_TAG, SHUTDOWN_TAG, days_left, keeps_recorded, shutdown_from_tags
from finetune_mlflow.lifecycle_record import lifecycle_tags, today
from finetune_mlflow.migration_plan import MigrationPlan, plan_migration
from finetune_mlflow.migration_report import render_report, table_columns
from finetune_mlflow.migration_rule import Interval, Rules, Standing, Verdict, cost_per_1k, decision_text, pick, \
    verdict
from finetune_mlflow.preparation import Prepared, load_prepared
from finetune_mlflow.providers import get_provider
from finetune_mlflow.run_cost import bills
from finetune_mlflow.scoring import RESULTS_TABLE, load_rows
from finetune_mlflow.scratch import download_artifacts
from finetune_mlflow.steps.capture import find_capture, read_capture, run_capture
from finetune_mlflow.steps.promote import run_promote
from finetune_mlflow.steps.tune import run_tune
from finetune_mlflow.tracking import log_values, quote, step_run

logger = logging.getLogger(__name__)

REPLACES_TAG = "migration.replaces"


@dataclass(frozen=True)
class MigrationResult:
    run_id: str
    champion: Standing
    candidates: list[Standing]
    verdicts: list[Verdict]
    winner: Standing | None
    moved: bool
    decision: str


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _retiring_champion(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    """The champion this migration replaces: the alias's version, or the one a finished migration replaced."""
    current = _alias(client, name, alias)
    if current is None:
        raise ConfigError(f"{name} has no {alias} alias: there is no champion to migrate (promote one first)")
    replaced = current.tags.get(REPLACES_TAG)
    return client.get_model_version(name, replaced) if replaced else current


def _refreshed_tags(version: ModelVersion, config: Config) -> dict[str, str]:
    """The version's tags with its lifecycle asked again (a provider unreachable here keeps the recorded one)."""
    tags = dict(version.tags)
    try:
        provider = get_provider(tags.get("provider", config.tune.provider), config)
    except FinetuneError as e:
        logger.warning("cannot ask %s about %s here (%s); using its recorded lifecycle", tags.get("provider"),
                       tags.get("tuned_model"), e)
        return tags
    fresh = lifecycle_tags(provider, tags.get("tuned_model", ""), tags.get("base_model", ""), config,
                           f"models:/{version.name}/{version.version}")
    if not keeps_recorded(tags, fresh):
        client = MlflowClient()
        for key, value in fresh.items():
            if tags.get(key) != value:
                client.set_model_version_tag(version.name, version.version, key, value)
        tags.update(fresh)
    return tags


def _interval(metrics: dict[str, float], key: str) -> Interval | None:
    if key not in metrics:
        return None
    return Interval(metrics[key], metrics.get(f"{key}_ci_low", metrics[key]), metrics.get(f"{key}_ci_high",
                                                                                         metrics[key]))


def _cost(tags: dict[str, str], metrics: dict[str, float], config: Config) -> float | None:
    provider = tags.get("provider", "")
    section = getattr(config, provider, None)
    table = getattr(section, "inference_price_per_million_tokens", {}) or {}
    price = None
    if provider in PROVIDERS:  # the provider says what its tuned model bills as (its base's rate, `ft:<base>`, ...)
        billed = provider_class(provider).billed_as(tags.get("tuned_model", ""), tags.get("base_model", ""))
        price = token_price(billed, table)
    return cost_per_1k(metrics.get("eval_n", 0.0), metrics.get("eval_input_tokens"),
                       metrics.get("eval_output_tokens"), price, bills(config, provider))


def _recorded_rows(version: ModelVersion) -> list:
    if not version.run_id or RESULTS_TABLE not in {a.path for a in MlflowClient().list_artifacts(version.run_id)}:
        raise FinetuneError(f"version {version.version} has no recorded per-question answers ({RESULTS_TABLE} on its "
                            "run): migrate compares with what the champion answered, never by calling it")
    return load_rows(version.run_id)


def _champion_prepared(version: ModelVersion) -> Prepared:
    tags = MlflowClient().get_run(version.run_id).data.tags
    if not tags.get("finetune.prepare_run_id"):
        raise FinetuneError(f"the champion's run {version.run_id} records no prepare run; its questions are unknown")
    return load_prepared(tags["finetune.prepare_run_id"], tags.get("finetune.data_sha256", ""))


def reuse_key(settings: dict) -> str:
    """What makes two candidate runs interchangeable: the data, tune and evaluate sections and the provider's own;
    not `lifecycle` or `promotion`, which a user edits as notices arrive without changing what a run trained."""
    provider = settings.get("tune", {}).get("provider", "")
    chosen = {name: settings.get(name) for name in ("data", "tune", "evaluate", provider)}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()


def _finished_candidate(candidate: Config, prepared: Prepared, experiment_id: str) -> str | None:
    """A finished, registered tune run of the same settings on the same data, if one exists."""
    client, wanted = MlflowClient(), reuse_key(candidate.to_dict())
    runs = client.search_runs([experiment_id], f"tags.`finetune.step` = 'tune' and tags.`finetune.data_sha256` = "
                              f"{quote(prepared.data_sha256)} and tags.`finetune.provider` = "
                              f"{quote(candidate.tune.provider)} and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        if not run.data.tags.get("finetune.registered_version"):
            continue
        logged = download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml").read_text(encoding="utf-8")
        if reuse_key(yaml.safe_load(logged) or {}) == wanted:
            return run.info.run_id
    return None


def _candidate_run(candidate: Config, prepared: Prepared, experiment_id: str) -> tuple[str | None, str | None]:
    """(tune run id, failure) of a candidate: an identical finished run is reused, else one is tuned now."""
    found = _finished_candidate(candidate, prepared, experiment_id)
    if found is not None:
        logger.info("candidate %s: reusing finished run %s", candidate.run_name("tune"), found)
        return found, None
    try:
        return run_tune(candidate, prepared=prepared).run_id, None
    except FinetuneError as e:
        logger.warning("candidate %s failed: %s", candidate.run_name("tune"), e)
        return None, f"its tune failed: {str(e).splitlines()[0][:300]}"


def _standing(label: str, version: ModelVersion, tags: dict[str, str], rows: list, metrics: dict[str, float],
              config: Config, champion_rows: list | None, agreement_metrics: dict[str, float] | None) -> Standing:
    delta = None
    if champion_rows is not None:
        found = delta_against(rows, champion_rows, bootstrap_samples=config.evaluate.bootstrap_samples,
                              seed=config.evaluate.bootstrap_seed, prefix="")
        delta = _interval(found, "f1_delta")
    shutdown = shutdown_from_tags(tags)
    return Standing(label=label, version=str(version.version), run_id=version.run_id,
                    f1=_interval(metrics, "eval_f1"), f1_delta=delta,
                    agreement_f1=_interval(agreement_metrics or {}, "agreement_f1"),
                    latency_ms_p95=metrics.get("latency_ms_p95"), error_rate=error_rate(rows),
                    cost_per_1k_usd=_cost(tags, metrics, config),
                    shutdown_date=tags.get(SHUTDOWN_TAG, "unknown"), days_left=days_left(shutdown, today()))


def _agreement(config: Config, plan: MigrationPlan, model_uri: str, recorded: dict[str, str] | None
               ) -> dict[str, float] | None:
    if recorded is None:
        return None
    answers = run_capture(config, model_uri, plan.prompts).answers
    return agreement(answers, recorded, samples=config.evaluate.bootstrap_samples, seed=config.evaluate.bootstrap_seed)


def _champion_capture(name: str, version: str, plan: MigrationPlan) -> dict[str, str] | None:
    if not plan.prompts:
        return None
    found = find_capture(f"models:/{name}/{version}", plan.prompts)
    if found is None:
        raise FinetuneError(f"migration.prompts is set but version {version}'s answers on {plan.prompts} were never "
                            f"captured; while it still answers, run: mlflow run . -e capture -P model=models:/{name}/"
                            f"{version} -P prompts={plan.prompts} (or drop migration.prompts)")
    return read_capture(found)


def _move(config: Config, name: str, champion: ModelVersion, winner: Standing, decision: str) -> bool:
    """Move the alias to the winner through promote (recorded there as a forced decision with this reason)."""
    client = MlflowClient()
    current = _alias(client, name, config.promotion.alias)
    if current is not None and str(current.version) == winner.version:
        logger.info("v%s is already %s: nothing moves", winner.version, config.promotion.alias)
        return False
    client.set_model_version_tag(name, winner.version, REPLACES_TAG, str(champion.version))
    result = run_promote(config, model_name=name, version=winner.version, force=True, reason=decision)
    client.set_model_version_tag(name, str(champion.version), "migration.replaced_by", winner.version)
    return result.decision.promote


def run_migrate(config: Config) -> MigrationResult:
    source = config.config_file or "<defaults>"
    plan = plan_migration(read_raw_section(config.config_file, "migration") if config.config_file else None, source)
    candidates = [with_overrides(config, point) for point in plan.candidates]  # every setting checked up front
    name, client = config.tune.registered_model_name, MlflowClient()
    with step_run("migrate", run_name=f"migrate {name}", tags={"migration.model": name}) as run:
        champion = _retiring_champion(client, name, config.promotion.alias)
        champion_tags = _refreshed_tags(champion, config)
        retiring = champion_tags.get(MODEL_TAG) or champion_tags.get("tuned_model", "the champion's model")
        champion_rows = _recorded_rows(champion)
        recorded = _champion_capture(name, str(champion.version), plan)
        prepared = _champion_prepared(champion)
        champion_standing = _standing(f"champion {champion_tags.get('provider', '')}/"
                                      f"{champion_tags.get('base_model', '')}", champion, champion_tags,
                                      champion_rows, dict(client.get_run(champion.run_id).data.metrics), config,
                                      None, {"agreement_f1": 100.0} if recorded is not None else None)
        standings = []
        for candidate in candidates:
            label = candidate.run_name("tune").removeprefix("tune ")
            run_id, failed = _candidate_run(candidate, prepared, run.info.experiment_id)
            if failed:
                standings.append(Standing(label, None, None, None, failed=failed))
                continue
            registered = client.get_run(run_id).data.tags["finetune.registered_version"]
            version = client.get_model_version(*registered.rsplit("/", 1))
            tags = dict(version.tags)
            rows = load_rows(run_id)
            standings.append(_standing(label, version, tags, rows, dict(client.get_run(run_id).data.metrics),
                                       candidate, champion_rows,
                                       _agreement(candidate, plan, f"models:/{name}/{version.version}", recorded)))
        rules = Rules(plan.max_f1_loss, plan.max_agreement_loss, recorded is not None,
                      config.promotion.max_latency_ms_p95, config.promotion.max_error_rate,
                      config.promotion.min_days_to_shutdown)
        verdicts = [verdict(s, rules) for s in standings]
        winner = pick(standings, verdicts)
        decision = decision_text(champion_standing, retiring, winner)
        mlflow.log_text(render_report(name, champion_standing, standings, verdicts, winner, decision, rules),
                        "migration_report.md")
        mlflow.log_table(table_columns(champion_standing, standings, verdicts), "migration.json")
        moved = _move(config, name, champion, winner, decision) if winner is not None else False
        log_values(client, run.info.run_id, tags={
            "migration.decision": decision[:5000], "migration.winner": winner.version if winner else "none",
            "migration.retiring_model": retiring, "migration.shutdown_date": champion_standing.shutdown_date,
            "mlflow.note.content": decision[:5000]})
        print(decision + ("" if moved or winner is None else f" (v{winner.version} is already "
                                                              f"{config.promotion.alias})"))
        for standing, result in zip(standings, verdicts):
            print(f"  v{standing.version or '-'} {standing.label}: {result.text()}")
        return MigrationResult(run.info.run_id, champion_standing, standings, verdicts, winner, moved, decision)

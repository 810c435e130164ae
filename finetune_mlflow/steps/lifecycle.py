"""lifecycle: refresh every registered version's shutdown date from its provider (or the config's dated entries)
and list them all, soonest first, with aliases, days left and the provider model that serves each.

Parameters in: `config` (its `lifecycle.models` entries and provider settings). Updates each version's lifecycle
tags (`finetune.shutdown_date`, ...). Logs a `lifecycle` run with the table as `lifecycle.json` and the printed
text as `lifecycle.txt`. A provider that cannot be asked (no credentials here) keeps the recorded facts, said so.
"""

from __future__ import annotations

import logging

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.lifecycle_facts import SHUTDOWN_TAG, keeps_recorded
from finetune_mlflow.lifecycle_record import lifecycle_tags, today
from finetune_mlflow.lifecycle_table import VersionRow, render, soonest_first, version_row
from finetune_mlflow.providers import get_provider
from finetune_mlflow.tracking import step_run

logger = logging.getLogger(__name__)


def _versions(client: MlflowClient):
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            yield model.name, version, tuple(sorted(aliases.get(str(version.version), [])))


def refresh(config: Config, client: MlflowClient) -> list[VersionRow]:
    """Ask each version's provider again and store the answer on the version; rows soonest first."""
    providers: dict[str, object] = {}
    rows = []
    for name, version, aliases in _versions(client):
        tags = dict(version.tags)
        provider_name = tags.get("provider", "")
        if provider_name and provider_name not in providers:
            try:
                providers[provider_name] = get_provider(provider_name, config)
            except FinetuneError as e:
                logger.warning("cannot ask %s about its models here (%s); showing the recorded dates", provider_name, e)
                providers[provider_name] = None
        provider = providers.get(provider_name)
        if provider is not None:
            fresh = lifecycle_tags(provider, tags.get("tuned_model", ""), tags.get("base_model", ""), config,
                                   f"models:/{name}/{version.version}")
            if keeps_recorded(tags, fresh):
                logger.info("%s v%s: the provider no longer reports a date (shut down?); keeping the recorded %s",
                            name, version.version, tags.get(SHUTDOWN_TAG))
            else:
                for key, value in fresh.items():
                    if tags.get(key) != value:
                        client.set_model_version_tag(name, version.version, key, value)
                tags.update(fresh)
        rows.append(version_row(name, str(version.version), aliases, tags, today()))
    return soonest_first(rows)


def run_lifecycle(config: Config) -> list[VersionRow]:
    client = MlflowClient()
    with step_run("lifecycle", run_name="lifecycle"):
        rows = refresh(config, client)
        text = render(rows)
        if rows:
            mlflow.log_table({key: [row.as_dict()[key] for row in rows] for key in rows[0].as_dict()},
                             "lifecycle.json")
        mlflow.log_text(text, "lifecycle.txt")
        print(text, end="")
        return rows

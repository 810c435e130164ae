"""OpenAI lifecycle through the real SDK against the fake: `models.retrieve` dates, a retired model, and a tune
refused because fine-tuning is closed (the server's 403, or a dated `new_jobs: closed` entry before any upload)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml

from mlflow.tracking import MlflowClient

from finetune_mlflow import cli
from finetune_mlflow.config import load_config
from finetune_mlflow.lifecycle_record import model_lifecycle, version_lifecycle
from finetune_mlflow.providers import get_provider

BASE = "gpt-4o-mini-2024-07-18"
TUNED = f"ft:{BASE}:org:squad:abc123"


def test_lifecycle_from_models_retrieve(openai_fake):
    shutdown = dt.date.today() + dt.timedelta(days=20)
    openai_fake.shutdown_dates[BASE] = shutdown.isoformat()
    config = load_config(None, {"provider": "openai", "evaluate.request_retries": "0", "openai.max_retries": "0"})
    provider = get_provider("openai", config)
    facts = provider.lifecycle(BASE)
    assert (facts.shutdown_date, facts.stage, facts.source) == (shutdown, "deprecated", "openai:models.retrieve")
    assert facts.days_left(dt.date.today()) == 20
    assert provider.lifecycle(TUNED).shutdown_date is None  # the API announces nothing for the tuned id itself...
    assert version_lifecycle(provider, TUNED, BASE, config).model == BASE  # ...so its base's date counts
    openai_fake.retired_models.add(TUNED)
    assert provider.lifecycle(TUNED) is None  # 404 model_not_found: nothing to read, not an error
    requested = [path for method, path, _, _ in openai_fake.requests if method == "GET"]
    assert f"/v1/models/{BASE}" in requested


def tune_args(small_squad, tmp_path, *extra: str) -> list[str]:
    train, validation = small_squad
    return ["tune", "--config", "experiments/squad_openai.yaml", "--train_data", str(train), "--validation_data",
            str(validation), "--max_examples", "60", "--max_validation_examples", "20", "--poll_interval", "0.05",
            "--registered_model_name", "closed-test", *extra]


def assert_nothing_left(openai_fake, err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "does not accept new fine-tuning jobs on gpt-4o-mini-2024-07-18" in errors[0] and "-e migrate" in errors[0]
    assert openai_fake.created_jobs == [] and openai_fake.files == {}
    client = MlflowClient()
    [run] = client.search_runs(["0"], "tags.`finetune.step` = 'tune'")
    assert run.info.status == "FAILED" and "finetune.job_id" not in run.data.tags
    return errors[0]


def test_closed_fine_tuning_is_one_line_and_leaves_nothing(openai_fake, small_squad, tmp_path, capsys):
    openai_fake.close_fine_tuning()
    assert cli.main(tune_args(small_squad, tmp_path)) == 2
    line = assert_nothing_left(openai_fake, capsys.readouterr().err)
    assert "403 training_not_available: Fine-tuning is not available for your organization." in line
    assert openai_fake.uploads and sorted(openai_fake.deleted_files) == sorted(u["id"] for u in openai_fake.uploads)


def test_a_dated_closed_entry_refuses_before_any_upload(openai_fake, small_squad, tmp_path, capsys):
    config = yaml.safe_load(Path("experiments/squad_openai.yaml").read_text())
    config["lifecycle"] = {"models": {BASE: {"shutdown_date": "2027-01-14", "new_jobs": "closed",
                                             "source": "deprecations page", "as_of": "2026-12-01"}}}
    path = tmp_path / "closed.yaml"
    path.write_text(yaml.safe_dump(config))
    args = tune_args(small_squad, tmp_path)
    args[2] = str(path)
    assert cli.main(args) == 2
    line = assert_nothing_left(openai_fake, capsys.readouterr().err)
    assert "per config lifecycle.models (deprecations page, as of 2026-12-01)" in line
    assert openai_fake.uploads == []

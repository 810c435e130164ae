"""Issue 21's "done when", end to end: an OpenAI `ft:` champion whose base snapshot shuts down in 20 days (counted
from today's clock) and whose organisation may no longer start fine-tuning jobs is replaced by `mlflow run . -e
migrate` with candidates on the local provider, a tiny transformers model and the Vertex fake; after the old model
answers 404, promote, report and a migrate rerun still work and launch nothing; a tune on OpenAI prints the one
error line and creates nothing.

Real SDK clients against the loopback fakes. Marked `migrate_e2e` and left out of the default run (it tunes four
models and runs one `mlflow run`: 83 s on 2 cores at load 4-6, 6 min at load 13; too long for the suite's budget):
`pytest -m migrate_e2e -n 0 tests/test_migrate_e2e.py`, or `scripts/migrate_e2e.sh`."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from finetune_mlflow import cli
from tests import e2e_support as e2e
from tests.fakes.openai_server import JobScript
from tests.fakes.vertex_server import FakeVertexServer
from tests.hf_tiny import FACTS, PASSAGES, build_tiny_model

pytestmark = pytest.mark.migrate_e2e

BASE_MODEL = "gpt-4o-mini-2024-07-18"
MODEL_NAME = "squad-qa-retiring"
TOKEN = "ya29.fake-migrate-token"
PROJECT = "migrate-project"


@pytest.fixture
def vertex_fake(monkeypatch, small_squad):
    with FakeVertexServer(project=PROJECT) as server:
        server.expected_token = TOKEN
        server.answer = e2e.vertex_responder(e2e.Answerer(e2e.gold_answers(small_squad[1])))
        monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", TOKEN)
        for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "FINETUNE_VERTEX_STAGING_BUCKET",
                     "GOOGLE_APPLICATION_CREDENTIALS"):
            monkeypatch.delenv(name, raising=False)
        yield server


def migration_config(tmp_path: Path, small_squad, vertex_url: str, tiny: Path) -> Path:
    """experiments/migrate_openai.yaml pointed at the fakes, test-sized, with a tiny transformers candidate."""
    config = yaml.safe_load((e2e.ROOT / "experiments" / "migrate_openai.yaml").read_text())
    train, validation = small_squad
    config["experiment"] = "migrate-e2e"
    config["data"].update(train_data=str(train), validation_data=str(validation), max_examples=120,
                          max_validation_examples=40)
    config["tune"].update(registered_model_name=MODEL_NAME, poll_interval=0.05, epochs=1)
    config["evaluate"].update(bootstrap_samples=200, trace_samples=0, checkpoints="last")
    config["vertex"].update(project=PROJECT, staging_bucket="migrate-bucket", api_endpoint=vertex_url,
                            storage_endpoint=vertex_url, request_timeout_seconds=30)
    config["transformers"].update(target_modules="all-linear", device="cpu", max_new_tokens=6, logging_steps=1,
                                  eval_steps=0, val_loss_examples=4, eval_batch_size=16)
    config["local"] = {"eval_every_steps": 5, "validation_loss_examples": 20}
    config["migration"]["candidates"] = [
        {"provider": "local", "base_model": "span-ranker-base", "epochs": 1, "learning_rate": 0.003,
         "batch_size": 32},
        {"provider": "transformers", "base_model": str(tiny), "epochs": 1, "learning_rate": 0.03, "batch_size": 8},
        {"provider": "vertex", "base_model": "gemini-2.5-flash", "epochs": 1, "learning_rate": 1.0,
         "batch_size": 0, "evaluate.max_output_tokens": 64},
    ]
    path = tmp_path / "migrate_fakes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def jobs_launched(openai_fake, vertex_fake, home: Path) -> tuple[int, int, int]:
    local = len(list((home / "local-jobs").glob("*"))) if (home / "local-jobs").exists() else 0
    hf = len(list((home / "hf-jobs").glob("*"))) if (home / "hf-jobs").exists() else 0
    return len(openai_fake.created_jobs), len(vertex_fake.created_jobs), local + hf


def test_migrate_off_a_retiring_openai_champion(openai_fake, vertex_fake, small_squad, tmp_path, capsys,
                                                 monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")  # runs go to the experiment the YAML names
    tiny = build_tiny_model(tmp_path / "tiny", PASSAGES + [a for _, a in FACTS])
    config = str(migration_config(tmp_path, small_squad, vertex_fake.url, tiny))
    shutdown = dt.date.today() + dt.timedelta(days=20)
    openai_fake.shutdown_dates[BASE_MODEL] = shutdown.isoformat()
    client = MlflowClient()

    # The champion: an ft: model tuned before fine-tuning closed; promoting it needs force (it retires in 20 days).
    openai_fake.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=6))
    code, out, err = cli_run(capsys, "tune", "--config", config)
    assert code == 0, err
    old = client.get_model_version(MODEL_NAME, "1")
    assert old.tags["finetune.shutdown_date"] == shutdown.isoformat()
    assert old.tags["finetune.lifecycle_model"] == BASE_MODEL and old.tags["tuned_model"].startswith("ft:")
    code, out, err = cli_run(capsys, "promote", "--config", config)
    assert code == 0 and "not promoted" in out and "within promotion.min_days_to_shutdown 30" in out
    code, out, err = cli_run(capsys, "promote", "--config", config, "--force", "true", "--reason", "the only model")
    assert code == 0 and str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    openai_fake.close_fine_tuning()

    # migrate, as a user runs it.
    submitted = e2e.run_entry_point("migrate", {"config": config})
    assert client.get_run(submitted.run_id).info.status == "FINISHED"
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) != "1" and champion.tags["provider"] == "vertex"
    assert champion.tags["migration.replaces"] == "1"
    [migrate_run] = client.search_runs([client.get_experiment_by_name("migrate-e2e").experiment_id],
                                       "tags.`finetune.step` = 'migrate'")
    decision = migrate_run.data.tags["migration.decision"]
    assert f"{BASE_MODEL} (champion v1) shuts down on {shutdown.isoformat()}" in decision
    assert client.get_model_version(MODEL_NAME, "1").tags["finetune.shutdown_date"] == shutdown.isoformat()
    versions = {v.tags["provider"] for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert versions == {"openai", "local", "transformers", "vertex"}  # all under the champion's name
    launched = jobs_launched(openai_fake, vertex_fake, Path(os.environ["FINETUNE_MLFLOW_HOME"]))
    assert launched[:2] == (1, 1) and launched[2] >= 2  # local and transformers jobs

    code, out, err = cli_run(capsys, "lifecycle", "--config", config)
    assert code == 0, err
    lines = [line.split() for line in out.splitlines()[1:]]
    assert lines[0][:5] == [MODEL_NAME, "1", "previous_champion", "20", shutdown.isoformat()]
    assert [MODEL_NAME, str(champion.version), "champion"] in [line[:3] for line in lines]

    # The old model shuts down: everything that compares with it reads its recorded answers.
    openai_fake.retired_models |= {old.tags["tuned_model"], BASE_MODEL}
    asked = len(openai_fake.chat_requests)
    local_version = next(str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")
                         if v.tags["provider"] == "local")
    assert cli_run(capsys, "promote", "--config", config, "--version", local_version)[0] == 0
    code, out, err = cli_run(capsys, "report", "--experiment", "migrate-e2e", "--out", str(tmp_path / "report"))
    assert code == 0, err
    code, out, err = cli_run(capsys, "migrate", "--config", config)
    assert code == 0, err
    assert f"v{champion.version} is already champion" in out
    assert jobs_launched(openai_fake, vertex_fake, Path(os.environ["FINETUNE_MLFLOW_HOME"])) == launched
    assert len(openai_fake.chat_requests) == asked
    assert client.get_model_version(MODEL_NAME, "1").tags["finetune.shutdown_date"] == shutdown.isoformat()

    # Fine-tuning is closed: one error line, nothing created, no run left RUNNING.
    uploads = len(openai_fake.uploads)
    code, out, err = cli_run(capsys, "tune", "--config", config)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert "does not accept new fine-tuning jobs on gpt-4o-mini-2024-07-18 (403 training_not_available" in errors[0]
    assert "-e migrate" in errors[0]
    assert len(openai_fake.created_jobs) == 1 and len(openai_fake.uploads) > uploads
    assert {u["id"] for u in openai_fake.uploads[uploads:]} <= set(openai_fake.deleted_files)
    running = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 "attributes.status = 'RUNNING'")
    assert running == []

"""The `sync` entry point against the fakes: import one job, every job (`all`, across list pages), a Vertex job by
name, and a second sync that updates the same run instead of creating another."""

from __future__ import annotations

from tests.e2e_support import all_experiment_ids
import json
import urllib.request

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from finetune_mlflow.providers.vertex.provider import SERIES_KEYS

from tests import e2e_support as e2e
from tests.fakes.openai_server import FakeOpenAI, JobScript
from tests.fakes.vertex_server import FakeVertexServer
from tests.fakes.vertex_server import JobScript as VertexScript
from tests.test_e2e_openai import served_history

OPENAI_MODEL = "squad-qa-openai-sync"


def sync_parameters(small_squad, job_id: str, **extra) -> dict[str, str]:
    train, validation = small_squad
    return {"config": "experiments/squad_openai.yaml", "provider": "openai", "job_id": job_id,
            "train_data": str(train), "validation_data": str(validation), "max_examples": "50",
            "registered_model_name": OPENAI_MODEL, **extra}


def job_runs(job_id: str) -> list:
    return MlflowClient().search_runs(all_experiment_ids(), f"tags.`finetune.job_id` = '{job_id}'")


def finished_job(server: FakeOpenAI, script: JobScript | None = None) -> str:
    """A job created outside this project (e.g. in the dashboard) that has already run to its end."""
    job_id = server.add_job(script or JobScript(n_steps=12, valid_every=3))
    server.advance(job_id, polls=len(server.jobs[job_id].script.statuses))
    return job_id


def test_sync_one_openai_job_then_resync_updates_the_same_run(openai_fake, small_squad):
    job_id = finished_job(openai_fake)
    first = e2e.run_entry_point("sync", sync_parameters(small_squad, job_id))
    client = MlflowClient()
    assert client.get_run(first.run_id).data.tags["finetune.step"] == "sync"
    runs = job_runs(job_id)
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == first.run_id
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["job_id"] == job_id and params["provider"] == "openai"
    assert params["base_model"] == "gpt-4o-mini-2024-07-18"
    assert params["epochs"] == "3" and params["learning_rate"] == "1.8"
    tuned_model = openai_fake.jobs[job_id].obj["fine_tuned_model"]
    assert tags["finetune.tuned_model"] == tuned_model and tags["finetune.job_state"] == "succeeded"
    assert tags["openai.result_files"] and tags["openai.training_file"] and tags["openai.checkpoints"]
    served = served_history(openai_fake, job_id)
    for key in ("train_loss", "val_loss"):
        assert e2e.history(run_id, key) == served[key]
    assert metrics["trained_tokens"] == 12_345 and metrics["eval_f1"] > e2e.base_metrics(run_id)["eval_f1"]
    job_json = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/job.json"))
    assert job_json["job_id"] == job_id and job_json["tuned_model"] == tuned_model
    versions = client.search_model_versions(f"name = '{OPENAI_MODEL}'")
    assert [(v.run_id, v.tags["tuned_model"], v.tags["job_id"]) for v in versions] == [(run_id, tuned_model, job_id)]
    chats = len(openai_fake.chat_requests)

    second = e2e.run_entry_point("sync", sync_parameters(small_squad, job_id))
    assert second.run_id != first.run_id
    runs = job_runs(job_id)
    assert [r.info.run_id for r in runs] == [run_id]  # updated, not duplicated
    for key in ("train_loss", "val_loss"):
        assert e2e.history(run_id, key) == served[key]  # no step twice
    assert len(e2e.history(run_id, "eval_f1")) == 1  # already evaluated: not evaluated again
    assert len(openai_fake.chat_requests) == chats
    assert len(client.search_model_versions(f"name = '{OPENAI_MODEL}'")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"

    # A synced version is promotable like a tuned one: its run records the data it was evaluated on.
    promoted = e2e.run_entry_point("promote", {"config": "experiments/squad_openai.yaml",
                                               "model_name": OPENAI_MODEL, "version": str(versions[0].version)})
    assert client.get_run(promoted.run_id).data.tags["promotion.decision"] == "promote"
    assert str(client.get_model_version_by_alias(OPENAI_MODEL, "champion").version) == str(versions[0].version)


def test_sync_all_follows_pages_and_records_every_state(openai_fake, small_squad):
    openai_fake.jobs_page_limit = 2
    succeeded = [finished_job(openai_fake) for _ in range(2)]
    failed = finished_job(openai_fake, JobScript(statuses=["validating_files", "failed"], error={
        "code": "invalid_training_file", "message": "Line 7: missing assistant message.", "param": None}))
    running = openai_fake.add_job(JobScript(statuses=["validating_files", "queued"] + ["running"] * 50 + ["succeeded"],
                                            n_steps=40))
    openai_fake.advance(running, polls=5)  # running, with some metric events already

    parent = e2e.run_entry_point("sync", sync_parameters(small_squad, "all"))
    list_calls = [q for method, path, q, _ in openai_fake.requests if method == "GET" and path == "/v1/fine_tuning/jobs"]
    assert len(list_calls) == 2 and "after" in list_calls[1]  # two pages of two jobs
    client = MlflowClient()
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics["sync_n_jobs"] == 4 and parent_run.data.metrics["sync_n_failed"] == 1
    assert parent_run.data.metrics["sync_n_unfinished"] == 1

    versions = client.search_model_versions(f"name = '{OPENAI_MODEL}'")
    assert sorted(v.tags["job_id"] for v in versions) == sorted(succeeded)
    for job_id in succeeded:
        [run] = job_runs(job_id)
        assert run.info.status == "FINISHED" and run.data.tags["finetune.registered_version"]
    [run] = job_runs(failed)
    assert run.info.status == "FAILED"
    assert run.data.tags["finetune.error_code"] == "invalid_training_file"
    assert run.data.tags["finetune.error_message"] == "Line 7: missing assistant message."
    [run] = job_runs(running)
    assert run.info.status == "FINISHED" and run.data.tags["finetune.job_state"] == "running"
    assert "finetune.registered_version" not in run.data.tags
    assert e2e.history(run.info.run_id, "train_loss") == served_history(openai_fake, running)["train_loss"]


def test_sync_a_vertex_job_by_name(monkeypatch, small_squad, tmp_path):
    token, project = "ya29.sync-token", "sync-project"
    with FakeVertexServer(project=project) as fake:
        fake.expected_token = token
        answerer = e2e.Answerer(e2e.gold_answers(small_squad[1]))
        fake.answer = e2e.vertex_responder(answerer)
        e2e.use_project_python(monkeypatch)
        monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", token)
        monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
        # A job created elsewhere (console, another tool), already finished.
        fake.script_next_job(VertexScript(points_per_poll=2))
        request = urllib.request.Request(
            f"{fake.url}/v1/projects/{project}/locations/us-central1/tuningJobs", method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            data=json.dumps({"baseModel": "gemini-2.5-flash", "supervisedTuningSpec": {
                "trainingDatasetUri": "gs://elsewhere/train.jsonl",
                "hyperParameters": {"epochCount": "3", "learningRateMultiplier": 0.5}}}).encode())
        with urllib.request.urlopen(request) as response:
            job_name = json.loads(response.read())["name"]
        fake.advance(job_name, 10)
        config = yaml.safe_load((e2e.ROOT / "experiments" / "squad_gemini_flash.yaml").read_text())
        config["vertex"].update(project=project, api_endpoint=fake.url, storage_endpoint=fake.url)
        config_file = tmp_path / "flash.yaml"
        config_file.write_text(yaml.safe_dump(config))
        train, validation = small_squad
        e2e.run_entry_point("sync", {"config": str(config_file), "job_id": job_name, "train_data": str(train),
                                     "validation_data": str(validation), "max_examples": "50",
                                     "registered_model_name": "squad-qa-gemini-sync"})
        [run] = job_runs(job_name)
        served = fake.served_series(job_name)
    endpoint = f"projects/{project}/locations/us-central1/endpoints/{job_name.rsplit('/', 1)[-1]}8"
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "3" and run.data.params["learning_rate"] == "0.5"
    assert run.data.params["base_model"] == "gemini-2.5-flash"
    assert run.data.tags["finetune.tuned_model"] == endpoint
    for display, key in SERIES_KEYS.items():
        assert e2e.history(run.info.run_id, key) == sorted(served[display])
    [version] = MlflowClient().search_model_versions("name = 'squad-qa-gemini-sync'")
    assert version.tags["tuned_model"] == endpoint and version.tags["job_id"] == job_name
    assert run.data.metrics["eval_f1"] > e2e.base_metrics(run.info.run_id)["eval_f1"]


def test_sync_without_a_job_id_is_a_config_error(capsys):
    from finetune_mlflow.cli import main

    assert main(["sync", "--config", str(e2e.ROOT / "experiments" / "squad_openai.yaml")]) == 2
    assert "pass -P job_id=" in capsys.readouterr().err

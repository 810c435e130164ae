"""End to end with Vertex AI: `mlflow.projects.run(entry_point="tune")` with the real google-genai, google-auth and
google-cloud-storage clients pointed at the in-process fake (endpoints from an experiment YAML), then kill -9
mid-job and reattach with --run-id, then a failed job."""

from __future__ import annotations

from tests.e2e_support import all_experiment_ids
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from finetune_mlflow.providers.vertex.provider import SERIES_KEYS

from tests import e2e_support as e2e
from tests.fakes.vertex_server import FakeVertexServer, JobScript, default_series

TOKEN = "ya29.fake-e2e-token"
PROJECT = "e2e-project"
BUCKET = "e2e-staging"
BASE_MODEL = "gemini-2.5-flash"
MODEL_NAME = "squad-qa-gemini-e2e"


@pytest.fixture
def fake(monkeypatch, small_squad):
    with FakeVertexServer(project=PROJECT) as server:
        server.expected_token = TOKEN
        answerer = e2e.Answerer(e2e.gold_answers(small_squad[1]), checkpoint_step=server.checkpoint_step)
        server.answer = e2e.vertex_responder(answerer)
        server.answerer = answerer
        e2e.use_project_python(monkeypatch)
        monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", TOKEN)
        for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "FINETUNE_VERTEX_STAGING_BUCKET",
                     "GOOGLE_APPLICATION_CREDENTIALS"):
            monkeypatch.delenv(name, raising=False)
        yield server


@pytest.fixture
def config_file(fake, tmp_path) -> Path:
    """experiments/squad_gemini_flash.yaml with the endpoints, project and bucket pointed at the fake."""
    config = yaml.safe_load((e2e.ROOT / "experiments" / "squad_gemini_flash.yaml").read_text())
    config["vertex"].update(project=PROJECT, staging_bucket=BUCKET, api_endpoint=fake.url, storage_endpoint=fake.url,
                            request_timeout_seconds=30)
    path = tmp_path / "gemini_flash_fake.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tune_parameters(config_file: Path, small_squad) -> dict[str, str]:
    train, validation = small_squad
    return {"config": str(config_file), "train_data": str(train), "validation_data": str(validation),
            "max_examples": "150", "poll_interval": "0.05", "registered_model_name": MODEL_NAME}


def served_history(fake: FakeVertexServer, job_name: str) -> dict[str, list[tuple[int, float]]]:
    served = fake.served_series(job_name)
    return {key: sorted(served[display]) for display, key in SERIES_KEYS.items()}


def assert_history_matches(run_id: str, served: dict[str, list[tuple[int, float]]]) -> None:
    for key in ("train_loss", "val_loss", "train_token_accuracy", "val_token_accuracy"):
        assert served[key], key
        assert e2e.history(run_id, key) == served[key], key  # step for step, nothing twice, nothing missing


def endpoint_of(job_name: str) -> str:
    job_id = job_name.rsplit("/", 1)[-1]
    return f"projects/{PROJECT}/locations/us-central1/endpoints/{job_id}8"


def assert_evaluated_and_registered(run_id: str, fake: FakeVertexServer, job_name: str) -> None:
    client = MlflowClient()
    run = client.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    endpoint = endpoint_of(job_name)
    assert tags["finetune.job_id"] == job_name and tags["finetune.tuned_model"] == endpoint
    assert tags["vertex.endpoint"] == endpoint and tags["finetune.job_state"] == "succeeded"
    assert tags["finetune.provider_status"] == "JOB_STATE_SUCCEEDED"
    # Thinking off, as Vertex recommends for tuned models, asked of every request and recorded on the run.
    assert tags["vertex.thinking_budget"] == "0"
    assert {r["generationConfig"]["thinkingConfig"]["thinking_budget"] for _, r in fake.generate_requests} == {0}

    em, f1, n = e2e.expected_scores(fake.answerer, lambda model: model.endswith(endpoint))
    base_em, base_f1, base_n = e2e.expected_scores(fake.answerer, lambda model: model.endswith("/" + BASE_MODEL))
    assert metrics["eval_n"] == n == base_n
    assert metrics["eval_exact_match"] == pytest.approx(em) and metrics["eval_f1"] == pytest.approx(f1)
    assert metrics["base_eval_f1"] == pytest.approx(base_f1) and metrics["base_eval_exact_match"] == pytest.approx(base_em)
    assert metrics["eval_f1"] > metrics["eval_exact_match"] > metrics["base_eval_exact_match"]
    assert metrics["latency_ms_p95"] > 0 and metrics["eval_error_count"] == 0
    assert metrics["tuning_dataset_example_count"] == 150

    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1
    version = versions[0]
    assert version.run_id == run_id and version.tags["tuned_model"] == endpoint
    assert version.tags["job_id"] == job_name and version.tags["provider"] == "vertex"
    assert version.tags["vertex.endpoint"] == endpoint and version.tags["vertex.model"].startswith("projects/")
    assert tags["finetune.registered_version"] == f"{MODEL_NAME}/{version.version}"


def test_tune_entry_point_end_to_end(fake, config_file, small_squad):
    fake.script_next_job(JobScript(states=["JOB_STATE_PENDING"] + ["JOB_STATE_RUNNING"] * 4 + ["JOB_STATE_SUCCEEDED"],
                                   series=default_series(n_steps=24, eval_every=4), points_per_poll=5))
    submitted = e2e.run_entry_point("tune", tune_parameters(config_file, small_squad))
    run = MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FINISHED"

    assert len(fake.created_jobs) == 1
    request = fake.created_jobs[0]
    assert request["baseModel"] == BASE_MODEL
    assert request["supervisedTuningSpec"]["hyperParameters"]["epochCount"] in (2, "2")  # from the Flash config
    assert {name for _, name, _ in fake.uploads} == {f"finetune-mlflow/{submitted.run_id}/train.jsonl",
                                                     f"finetune-mlflow/{submitted.run_id}/validation.jsonl"}
    job_name = run.data.tags["finetune.job_id"]
    assert job_name == fake.job_names()[0]
    assert set(fake.auth_headers) == {f"Bearer {TOKEN}"}

    assert_history_matches(submitted.run_id, served_history(fake, job_name))
    assert_evaluated_and_registered(submitted.run_id, fake, job_name)


def test_kill_minus_9_then_rerun_with_run_id_reattaches(fake, config_file, small_squad, tmp_path):
    # A long timeline, one point per series per poll: the job is mid-way when the process is killed.
    states = ["JOB_STATE_PENDING"] + ["JOB_STATE_RUNNING"] * 400 + ["JOB_STATE_SUCCEEDED"]
    fake.script_next_job(JobScript(states=states, series=default_series(n_steps=200, eval_every=5), points_per_poll=1))
    parameters = tune_parameters(config_file, small_squad)
    log = tmp_path / "first.log"
    proc = e2e.start_cli(["tune"] + [f"--{key}={value}" for key, value in parameters.items()], log)
    try:
        run = e2e.wait_for(e2e.run_with_job_tag(proc, log), timeout=60,
                           what="a tune run with a job id and train_loss points")
    finally:
        e2e.kill_group(proc)
    run_id = run.info.run_id
    job_name = run.data.tags["finetune.job_id"]
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nobody marked it
    assert len(e2e.history(run_id, "train_loss")) < 200
    # The job went on while nobody watched: all but the last few polls happen before the rerun.
    job = fake._job(job_name)
    fake.advance(job_name, len(states) - 4 - job.polls)

    submitted = e2e.run_entry_point("tune", parameters, run_id=run_id)
    assert submitted.run_id == run_id
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert len(fake.created_jobs) == 1  # reattached: no second job was paid for
    assert_history_matches(run_id, served_history(fake, job_name))
    assert len(e2e.history(run_id, "train_loss")) == 200
    assert_evaluated_and_registered(run_id, fake, job_name)


def test_failed_job_fails_the_run_with_the_providers_error(fake, config_file, small_squad, tmp_path):
    error = {"code": 3, "message": "Dataset validation failed: 12 examples exceed the token limit."}
    fake.script_next_job(JobScript(states=["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_FAILED"], error=error))
    parameters = tune_parameters(config_file, small_squad)
    MlflowClient().search_experiments()  # create the store's tables before the child uses it
    done = subprocess.run([sys.executable, "-m", "finetune_mlflow", "tune"]
                          + [f"--{key}={value}" for key, value in parameters.items()],
                          cwd=e2e.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Dataset validation failed" in done.stderr
    client = MlflowClient()
    runs = client.search_runs(all_experiment_ids(), "tags.`finetune.step` = 'tune'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["finetune.error_code"] == "3"
    assert run.data.tags["finetune.error_message"] == error["message"]
    assert run.data.tags["finetune.job_state"] == "failed"
    assert len(fake.created_jobs) == 1 and fake.generate_requests == []
    assert client.search_registered_models() == []

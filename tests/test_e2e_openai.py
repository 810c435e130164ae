"""End to end with OpenAI: `mlflow.projects.run(entry_point="tune")` with the real `openai` client pointed at the
in-process fake, then kill -9 mid-job and reattach with --run-id, then a failed job."""

from __future__ import annotations

from tests.e2e_support import all_experiment_ids
import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.providers.openai import data as openai_data

from tests import e2e_support as e2e
from tests.fakes.openai_server import FakeOpenAI, JobScript

BASE_MODEL = "gpt-4o-mini-2024-07-18"
MODEL_NAME = "squad-qa-openai-e2e"
CONFIG = "experiments/squad_openai.yaml"


def tune_parameters(small_squad, **extra) -> dict[str, str]:
    train, validation = small_squad
    return {"config": CONFIG, "provider": "openai", "base_model": BASE_MODEL, "train_data": str(train),
            "validation_data": str(validation), "max_examples": "150", "poll_interval": "0.05",
            "registered_model_name": MODEL_NAME, **extra}


def served_history(server: FakeOpenAI, job_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric point the fake served for a job, by key, in step order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in server.metric_events_of(job_id):
        for point in openai_data.metrics_from_data(event["data"], event["created_at"] * 1000):
            out.setdefault(point.key, []).append((point.step, point.value))
    return {key: sorted(points) for key, points in out.items()}


def assert_history_matches(run_id: str, served: dict[str, list[tuple[int, float]]]) -> None:
    for key in ("train_loss", "val_loss", "train_mean_token_accuracy"):
        assert served[key], key
        assert e2e.history(run_id, key) == served[key], key  # step for step, nothing twice, nothing missing


def assert_evaluated_and_registered(run_id: str, server: FakeOpenAI, job_id: str) -> None:
    client = MlflowClient()
    run = client.get_run(run_id)
    tuned_model = server.jobs[job_id].obj["fine_tuned_model"]
    assert tuned_model.startswith("ft:" + BASE_MODEL)
    metrics, tags = run.data.metrics, run.data.tags
    assert tags["finetune.job_id"] == job_id and tags["finetune.tuned_model"] == tuned_model
    assert tags["finetune.job_state"] == "succeeded"

    em, f1, n = e2e.expected_scores(server.answerer, lambda model: model == tuned_model)
    base_em, base_f1, base_n = e2e.expected_scores(server.answerer, lambda model: model == BASE_MODEL)
    assert metrics["eval_n"] == n == base_n
    assert metrics["eval_exact_match"] == pytest.approx(em) and metrics["eval_f1"] == pytest.approx(f1)
    base = e2e.base_metrics(run_id)
    assert base["eval_f1"] == pytest.approx(base_f1) and base["eval_exact_match"] == pytest.approx(base_em)
    assert metrics["eval_f1"] > metrics["eval_exact_match"] > base["eval_exact_match"]
    assert metrics["eval_f1_delta"] == pytest.approx(f1 - base_f1)
    assert metrics["latency_ms_p95"] > 0 and metrics["eval_error_count"] == 0
    assert metrics["eval_input_tokens"] > 0 and metrics["eval_output_tokens"] > 0
    assert metrics["trained_tokens"] == 12_345 and "full_valid_loss" in metrics
    assert metrics["estimated_cost_usd"] < 5.0  # the config's max_cost_usd guard let it through

    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1
    version = versions[0]
    assert version.run_id == run_id and version.tags["tuned_model"] == tuned_model
    assert version.tags["job_id"] == job_id and version.tags["provider"] == "openai"
    assert tags["finetune.registered_version"] == f"{MODEL_NAME}/{version.version}"


def test_tune_entry_point_end_to_end(openai_fake, small_squad):
    openai_fake.script_next_job(JobScript(statuses=["validating_files", "queued"] + ["running"] * 5 + ["succeeded"],
                                   n_steps=30, valid_every=5))
    submitted = e2e.run_entry_point("tune", tune_parameters(small_squad))
    run = MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FINISHED"

    assert len(openai_fake.created_jobs) == 1
    body = openai_fake.created_jobs[0]
    assert body["model"] == BASE_MODEL and body["metadata"] == {"mlflow_run_id": submitted.run_id}
    assert body["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2  # from experiments/squad_openai.yaml
    job_id = run.data.tags["finetune.job_id"]
    train_upload = next(u for u in openai_fake.uploads if u["id"] == body["training_file"])
    assert len(train_upload["content"].decode().splitlines()) == 150

    assert_history_matches(submitted.run_id, served_history(openai_fake, job_id))
    assert_evaluated_and_registered(submitted.run_id, openai_fake, job_id)
    tags = run.data.tags
    assert {"finetune.status.validating_files", "finetune.status.running", "finetune.status.succeeded"} <= set(tags)


def test_evaluate_an_existing_ft_model_by_id(openai_fake, small_squad):
    """Existing `ft:` models keep serving after the fine-tuning phase-out: evaluate one without any job."""
    tuned = "ft:gpt-4o-mini-2024-07-18:org-fake:squad:abc123"
    train, validation = small_squad
    submitted = e2e.run_entry_point("evaluate", {"config": CONFIG, "model": tuned, "train_data": str(train),
                                                 "validation_data": str(validation)})
    run = MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["finetune.model_ref"] == tuned
    em, f1, n = e2e.expected_scores(openai_fake.answerer, lambda model: model == tuned)
    assert run.data.metrics["eval_n"] == n
    assert run.data.metrics["eval_f1"] == pytest.approx(f1) and run.data.metrics["eval_exact_match"] == pytest.approx(em)
    assert run.data.metrics["eval_input_tokens"] > 0


def test_kill_minus_9_then_rerun_with_run_id_reattaches(openai_fake, small_squad, tmp_path):
    # A long timeline: one metric event every 5 polls, so the job is mid-way when the process is killed.
    openai_fake.script_next_job(JobScript(statuses=["validating_files", "queued"] + ["running"] * 300 + ["succeeded"],
                                   n_steps=60, valid_every=5))
    parameters = tune_parameters(small_squad)
    args = ["tune"] + [f"--{key}={value}" for key, value in parameters.items()]
    proc = e2e.start_cli(args, tmp_path / "first.log")
    try:
        run = e2e.wait_for(e2e.run_with_job_tag(proc, tmp_path / "first.log"), proc, tmp_path / "first.log",
                           what="a tune run with a job id and train_loss points")
    finally:
        e2e.kill_group(proc)
    run_id = run.info.run_id
    job_id = run.data.tags["finetune.job_id"]
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nobody marked it
    job = openai_fake.jobs[job_id]
    logged_before = len(e2e.history(run_id, "train_loss"))
    assert job.obj["status"] == "running" and logged_before < 60
    # The job went on while nobody watched: all but the last few polls happen before the rerun.
    openai_fake.advance(job_id, polls=len(job.script.statuses) - 4 - job.poll)
    assert job.obj["status"] == "running"

    submitted = e2e.run_entry_point("tune", parameters, run_id=run_id)
    assert submitted.run_id == run_id
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert len(openai_fake.created_jobs) == 1  # reattached: no second job was paid for
    assert_history_matches(run_id, served_history(openai_fake, job_id))
    assert len(e2e.history(run_id, "train_loss")) == 60
    assert_evaluated_and_registered(run_id, openai_fake, job_id)


def test_failed_job_fails_the_run_with_the_providers_error(openai_fake, small_squad):
    error = {"code": "invalid_training_file", "message": "Training file has 3 examples with too many tokens.",
             "param": "training_file"}
    openai_fake.script_next_job(JobScript(statuses=["validating_files", "queued", "failed"], error=error))
    from mlflow.exceptions import ExecutionException

    with pytest.raises(ExecutionException, match="failed"):  # the command exited non-zero
        e2e.run_entry_point("tune", tune_parameters(small_squad))
    client = MlflowClient()
    runs = client.search_runs(all_experiment_ids(), "tags.`finetune.step` = 'tune'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["finetune.error_code"] == "invalid_training_file"
    assert run.data.tags["finetune.error_message"].startswith("Training file has 3 examples with too many tokens.")
    assert run.data.tags["finetune.job_state"] == "failed"
    assert len(openai_fake.created_jobs) == 1 and openai_fake.chat_requests == []
    assert client.search_registered_models() == []

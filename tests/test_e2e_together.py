"""End to end with Together AI, the issue's "done when": `mlflow run . -e tune -P config=experiments/squad_together.yaml`
with the real `together` SDK pointed at the loopback fake (TOGETHER_BASE_URL), then kill -9 mid-job and a
`--run-id` rerun that reattaches, then `sync -P job_id=all` over two finished jobs and a failed one."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests import e2e_support as e2e
from tests.fakes.together_server import FakeTogether, JobScript

CONFIG = "experiments/squad_together.yaml"
BASE_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
MODEL_NAME = "squad-qa-together-e2e"


@pytest.fixture
def together_fake(monkeypatch, small_squad):
    with FakeTogether() as server:
        answerer = e2e.Answerer(e2e.gold_answers(small_squad[1]), checkpoint_step=server.checkpoint_step,
                                tuned=server.is_tuned)
        server.chat_responder = e2e.openai_responder(answerer)
        server.answerer = answerer
        e2e.use_project_python(monkeypatch)
        monkeypatch.setenv("TOGETHER_API_KEY", "tgp-e2e-0123456789abcdefghijklmnop")
        monkeypatch.setenv("TOGETHER_BASE_URL", server.base_url)
        yield server
        assert server.handler_errors == []


def tune_parameters(small_squad, **extra) -> dict[str, str]:
    train, validation = small_squad
    return {"config": CONFIG, "train_data": str(train), "validation_data": str(validation), "max_examples": "60",
            "max_validation_examples": "40", "poll_interval": "0.05", "registered_model_name": MODEL_NAME, **extra}


def assert_every_loss_once(run_id: str, server: FakeTogether, job_id: str) -> None:
    served = server.served_points(job_id)
    for key in ("train_loss", "val_loss"):
        assert served[key], key
        assert e2e.history(run_id, key) == served[key], key  # step for step, nothing twice, nothing missing


def assert_evaluated_and_registered(run_id: str, server: FakeTogether, job_id: str) -> str:
    """Base, both intermediate checkpoints and the tuned model were scored on every question; one servable
    version was registered; returns its URI."""
    client = MlflowClient()
    run = client.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    tuned = server.jobs[job_id].obj["model_output_name"]
    assert tags["finetune.job_id"] == job_id and tags["finetune.tuned_model"] == tuned
    em, f1, n = e2e.expected_scores(server.answerer, lambda model: model == tuned)
    assert metrics["eval_f1"] == pytest.approx(f1) and metrics["eval_exact_match"] == pytest.approx(em)
    base = client.get_run(tags["finetune.base_eval_run_id"]).data.metrics  # the base's scores live on its own run
    assert base["eval_f1"] < metrics["eval_f1"] and metrics["eval_n"] == n
    assert [step for step, _ in e2e.history(run_id, "checkpoint_eval_f1")] == [7, 13]  # 3 kept, 20 is final
    assert metrics["billed_training_tokens"] == 23_456 * 2 and metrics["provider_total_price_usd"] == 1.25
    asked = {body["model"] for body in server.chat_requests}
    assert asked == {BASE_MODEL, tuned, f"{tuned}-step-7", f"{tuned}-step-13"}
    # Every chat request was an evaluation question, each model asked each question once: registration asked
    # nothing (MLflow would predict the input example, a question the validation set does not hold).
    assert len(server.chat_requests) == len(server.answerer.asked) == 4 * n
    [version] = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert version.run_id == run_id and version.tags["provider"] == "together" and version.tags["job_id"] == job_id
    return f"models:/{MODEL_NAME}/{version.version}"


def assert_served(uri: str, server: FakeTogether, small_squad) -> None:
    """The registered version loads and answers through the fake with the model it registered."""
    question = next(q for q in server.answerer.golds if e2e.bucket(q) == 0)
    context = _context_of(small_squad[1], question)
    before = len(server.chat_requests)
    answers = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"question": [question], "context": [context]}))
    assert answers["answer"].tolist() == [server.answerer.golds[question][0]]
    assert len(server.chat_requests) == before + 1 and server.is_tuned(server.chat_requests[-1]["model"])


def _context_of(squad_file, question: str) -> str:
    import json

    for article in json.loads(squad_file.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            if any(qa["question"].strip() == question for qa in paragraph["qas"]):
                return paragraph["context"]
    raise AssertionError(question)


def test_tune_with_the_shipped_config_end_to_end(together_fake, small_squad):
    together_fake.script_next_job(JobScript(statuses=["pending", "queued"] + ["running"] * 5 + ["uploading",
                                                                                              "completed"],
                                            n_steps=20, eval_every=5))
    submitted = e2e.run_entry_point("tune", tune_parameters(small_squad))
    run = MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FINISHED"
    [body] = together_fake.created_jobs
    assert body["model"] == BASE_MODEL and body["n_epochs"] == 2 and body["training_type"]["lora_r"] == 8
    job_id = run.data.tags["finetune.job_id"]
    assert_every_loss_once(submitted.run_id, together_fake, job_id)
    uri = assert_evaluated_and_registered(submitted.run_id, together_fake, job_id)
    assert_served(uri, together_fake, small_squad)
    assert_no_key_stored(run)


def assert_no_key_stored(run) -> None:
    """TOGETHER_API_KEY is in no param, tag, tracking-store byte or artifact (run, logged and registered model)."""
    import os
    from pathlib import Path

    key = os.environ["TOGETHER_API_KEY"].encode()
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    experiment_dir = Path(run.info.artifact_uri.removeprefix("file://")).parents[1]
    files = [store, *(p for p in experiment_dir.rglob("*") if p.is_file())]
    assert any(p.name == "MLmodel" for p in files) and store.stat().st_size > 0
    assert [str(p) for p in files if key in p.read_bytes()] == []


def test_kill_minus_9_then_rerun_with_run_id_reattaches(together_fake, small_squad, tmp_path):
    together_fake.script_next_job(JobScript(statuses=["pending", "queued"] + ["running"] * 300 + ["completed"],
                                            n_steps=20, eval_every=5))
    parameters = tune_parameters(small_squad)
    proc = e2e.start_cli(["tune"] + [f"--{k}={v}" for k, v in parameters.items()], tmp_path / "first.log")
    try:
        run = e2e.wait_for(e2e.run_with_job_tag(proc, tmp_path / "first.log"), proc, tmp_path / "first.log",
                           what="a tune run with a job id and train_loss points")
    finally:
        e2e.kill_group(proc)
    run_id, job_id = run.info.run_id, run.data.tags["finetune.job_id"]
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nobody marked it
    job = together_fake.jobs[job_id]
    assert job.obj["status"] == "running" and len(e2e.history(run_id, "train_loss")) < 20
    together_fake.advance(job_id, polls=len(job.script.statuses) - 4 - job.poll)  # it went on unwatched

    submitted = e2e.run_entry_point("tune", parameters, run_id=run_id)
    assert submitted.run_id == run_id and MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert len(together_fake.created_jobs) == 1  # reattached: no second job was paid for
    assert_every_loss_once(run_id, together_fake, job_id)
    assert_evaluated_and_registered(run_id, together_fake, job_id)


def test_sync_all_imports_finished_and_failed_jobs(together_fake, small_squad):
    finished = []
    for _ in range(2):
        job_id = together_fake.add_job(JobScript(n_steps=12))
        together_fake.advance(job_id, polls=10)
        finished.append(job_id)
    failed = together_fake.add_job(JobScript(statuses=["pending", "running", "error"],
                                             error_message="Line 7: the assistant message is empty."))
    together_fake.advance(failed, polls=3)
    train, validation = small_squad
    parent = e2e.run_entry_point("sync", {"config": CONFIG, "provider": "together", "job_id": "all",
                                          "train_data": str(train), "validation_data": str(validation),
                                          "max_examples": "50", "max_validation_examples": "30",
                                          "registered_model_name": MODEL_NAME})
    client = MlflowClient()
    metrics = client.get_run(parent.run_id).data.metrics
    assert (metrics["sync_n_jobs"], metrics["sync_n_succeeded"], metrics["sync_n_failed"]) == (3, 2, 1)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(v.tags["job_id"] for v in versions) == sorted(finished)
    for job_id in finished:
        [run] = client.search_runs(e2e.all_experiment_ids(), f"tags.`finetune.job_id` = '{job_id}'")
        assert run.info.status == "FINISHED"
        assert e2e.history(run.info.run_id, "train_loss") == together_fake.served_points(job_id)["train_loss"]
    [run] = client.search_runs(e2e.all_experiment_ids(), f"tags.`finetune.job_id` = '{failed}'")
    assert run.info.status == "FAILED" and run.data.tags["finetune.job_state"] == "failed"
    assert run.data.tags["finetune.error_message"] == "Line 7: the assistant message is empty."

"""Tune and evaluate through a storm of faults: 429s with Retry-After, 500/503s, dropped connections and slow
answers on a share of every call to the fake provider. The run must finish with exactly one job, the served
loss curves step for step, and the same scores as on a quiet day.

The faults fire from a seeded generator and evaluation runs one request at a time, so a run is repeatable.
"""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import load_config
from finetune_mlflow.steps.tune import run_tune
from tests import e2e_support as e2e
from tests.fakes.loopback import RESET
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.openai_server import JobScript as OpenAIScript
from tests.fakes.vertex_server import ROUTES, FakeVertexServer
from tests.fakes.vertex_server import JobScript as VertexScript
from tests.test_e2e_openai import served_history

QUIET_RETRIES = {"evaluate.retry_backoff_seconds": "0.01", "evaluate.request_retries": "6",
                 "max_concurrency": "1", "poll_interval": "0.01"}


def data_overrides(small_squad) -> dict[str, str]:
    train, validation = small_squad
    return {"train_data": str(train), "validation_data": str(validation), "max_examples": "60"}


def assert_scores_match(run_id: str, answerer: e2e.Answerer, tuned_model: str) -> None:
    metrics = MlflowClient().get_run(run_id).data.metrics
    em, f1, n = e2e.expected_scores(answerer, lambda model: model == tuned_model)
    assert metrics["eval_error_count"] == 0 and metrics["eval_n"] == n
    assert metrics["eval_exact_match"] == pytest.approx(em) and metrics["eval_f1"] == pytest.approx(f1)
    assert metrics["eval_retry_wait_ms_total"] > 0  # retries happened, and their waits were kept out of latency


def test_openai_tune_survives_a_fault_storm(small_squad, monkeypatch):
    with FakeOpenAI(seed=7) as server:
        answerer = e2e.Answerer(e2e.gold_answers(small_squad[1]))
        server.chat_responder = e2e.openai_responder(answerer)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-storm-0123456789abcdefghij")
        for status, fraction, extra in ((429, 0.08, {"retry_after": "0"}), (500, 0.05, {}), (503, 0.05, {}),
                                        (RESET, 0.05, {}), (None, 0.05, {"delay_s": 0.05})):
            server.inject(r"/v1/", status=status, times=None, fraction=fraction, **extra)
        server.script_next_job(OpenAIScript(statuses=["validating_files", "queued"] + ["running"] * 6 + ["succeeded"],
                                            n_steps=24, valid_every=4))
        config = load_config(e2e.ROOT / "experiments" / "squad_openai.yaml",
                             {**data_overrides(small_squad), **QUIET_RETRIES, "openai.base_url": server.base_url,
                              "openai.max_retries": "6", "registered_model_name": "storm-openai"})
        result = run_tune(config)
        assert len(server.created_jobs) == 1
        fired = [r for r in server.requests if r[3] >= 400]
        assert len(fired) >= 10, "the storm must actually hit the run"
        served = served_history(server, result.job.job_id)
        for key in ("train_loss", "val_loss"):
            assert e2e.history(result.run_id, key) == served[key], key
        assert_scores_match(result.run_id, answerer, result.job.tuned_model)


def test_vertex_tune_survives_a_fault_storm(small_squad, monkeypatch, tmp_path):
    with FakeVertexServer(project="storm-project") as server:
        server.expected_token = "ya29.storm"
        answerer = e2e.Answerer(e2e.gold_answers(small_squad[1]))
        server.answer = e2e.vertex_responder(answerer)
        monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", "ya29.storm")
        for route in ROUTES:
            for status, fraction, extra in ((429, 0.08, {"retry_after": 0}), (500, 0.05, {}), (503, 0.05, {}),
                                            (RESET, 0.05, {}), (None, 0.05, {"delay": 0.05})):
                if status is None:
                    server.slow(route, extra["delay"], times=10_000)
                else:
                    server.fail(route, status, times=10_000, fraction=fraction, **extra)
        server.script_next_job(VertexScript(states=["JOB_STATE_PENDING"] + ["JOB_STATE_RUNNING"] * 6
                                            + ["JOB_STATE_SUCCEEDED"], points_per_poll=2))
        yaml_config = yaml.safe_load((e2e.ROOT / "experiments" / "squad_gemini_flash.yaml").read_text())
        yaml_config["vertex"].update(project="storm-project", staging_bucket="storm-bucket", api_endpoint=server.url,
                                     storage_endpoint=server.url)
        path = tmp_path / "storm.yaml"
        path.write_text(yaml.safe_dump(yaml_config))
        config = load_config(path, {**data_overrides(small_squad), **QUIET_RETRIES,
                                    "registered_model_name": "storm-vertex"})
        result = run_tune(config)
        assert len(server.created_jobs) == 1
        served = server.served_series(result.job.job_id)
        assert e2e.history(result.run_id, "train_loss") == sorted(served["/train_total_loss"])
        assert e2e.history(result.run_id, "val_loss") == sorted(served["/eval_total_loss"])
        assert_scores_match(result.run_id, answerer, result.job.tuned_model)


def test_fake_faults_are_real():
    """Guard for the storm tests: a dropped connection really surfaces as a connection error in a client."""
    import urllib.error
    import urllib.request

    with FakeOpenAI() as server:
        server.inject(r"/v1/models", status=RESET)
        request = urllib.request.Request(f"{server.base_url}/models",
                                         headers={"Authorization": "Bearer sk-test-x"})
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(request, timeout=5)

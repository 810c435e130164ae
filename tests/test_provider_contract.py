"""One contract, every provider: the normalized behaviour tune and evaluate rely on.

Each provider runs through its real client: the local trainer process, the `openai` SDK against the fake OpenAI
server, google-genai and google-cloud-storage against the fake Vertex server, the `together` SDK against the fake
Together server.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import pytest

from finetune_mlflow.config import load_config
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, Prediction, Provider, TuningRequest
from finetune_mlflow.preparation import write_splits
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.openai_server import JobScript as OpenAIScript
from tests.fakes.together_server import FakeTogether
from tests.fakes.together_server import JobScript as TogetherScript
from tests.fakes.vertex_server import FakeVertexServer
from tests.fakes.vertex_server import JobScript as VertexScript

OPENAI_KEY = "sk-test-contract-0123456789abcdefghijklmnop"
VERTEX_TOKEN = "ya29.contract-token"


@dataclasses.dataclass
class Harness:
    provider: Provider
    base_model: str
    # Makes the next job fail with the provider's own error shape.
    script_failure: Callable[[], None]
    # Pause between polls: the fakes advance per request, the local trainer needs real time.
    pause: float


@pytest.fixture
def prepared(small_squad, tmp_path) -> Path:
    train, validation = small_squad
    config = load_config(None, {"train_data": str(train), "validation_data": str(validation), "max_examples": "40",
                                "data.max_validation_examples": "12"})
    write_splits(config, tmp_path / "prepared")
    return tmp_path / "prepared"


def _local(stack: ExitStack, monkeypatch, prepared: Path) -> Harness:
    def failure() -> None:  # no answer inside any candidate span: the trainer itself reports failure
        (prepared / "train.jsonl").write_text('{"id": "x", "title": "", "question": "Why?", "context": "No.", '
                                              '"answers": ["Nothing here at all"]}\n', encoding="utf-8")

    return Harness(get_provider("local", load_config(None)), "span-ranker-base", failure, 0.05)


def _openai(stack: ExitStack, monkeypatch, prepared: Path) -> Harness:
    server = stack.enter_context(FakeOpenAI())
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    config = load_config(None, {"provider": "openai", "openai.base_url": server.base_url})
    provider = get_provider("openai", config)
    server.chat_responder = lambda body: "Denver Broncos"

    def failure() -> None:
        server.script_next_job(OpenAIScript(statuses=["validating_files", "running", "failed"],
                                            error={"code": "invalid_training_file", "message": "bad line 3",
                                                   "param": "training_file"}))

    return Harness(provider, "gpt-4o-mini-2024-07-18", failure, 0.0)


def _vertex(stack: ExitStack, monkeypatch, prepared: Path) -> Harness:
    server = stack.enter_context(FakeVertexServer(project="contract-project"))
    server.expected_token = VERTEX_TOKEN
    server.answer = lambda model, body: "Denver Broncos"
    monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", VERTEX_TOKEN)
    config = load_config(None, {"provider": "vertex", "vertex.project": "contract-project",
                                "vertex.location": "us-central1", "vertex.staging_bucket": "contract-bucket",
                                "vertex.api_endpoint": server.url, "vertex.storage_endpoint": server.url})
    provider = get_provider("vertex", config)

    def failure() -> None:
        server.script_next_job(VertexScript(states=["JOB_STATE_PENDING", "JOB_STATE_FAILED"],
                                            error={"code": 3, "message": "invalid dataset row 3"}))

    return Harness(provider, "gemini-2.5-flash", failure, 0.0)


def _together(stack: ExitStack, monkeypatch, prepared: Path) -> Harness:
    server = stack.enter_context(FakeTogether())
    monkeypatch.setenv("TOGETHER_API_KEY", "tgp-contract-0123456789abcdef")
    monkeypatch.delenv("TOGETHER_BASE_URL", raising=False)
    config = load_config(None, {"provider": "together", "together.base_url": server.base_url,
                                "learning_rate": "0.0001"})
    server.chat_responder = lambda body: "Denver Broncos"

    def failure() -> None:
        server.script_next_job(TogetherScript(statuses=["pending", "running", "error"],
                                              error_message="invalid dataset row 3"))

    return Harness(get_provider("together", config), "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", failure, 0.0)


def _transformers(stack: ExitStack, monkeypatch, prepared: Path) -> Harness:
    pytest.importorskip("trl", reason="the transformers provider needs the extra: pip install -e '.[transformers]'")
    from finetune_mlflow.records import read_jsonl
    from tests.hf_tiny import build_tiny_model

    texts = [f"{r['question']} {r['context']} {r['answers'][0]}" for r in read_jsonl(prepared / "train.jsonl")]
    model = build_tiny_model(prepared.parent / "tiny-llama", texts)
    config = load_config(None, {"provider": "transformers", "transformers.device": "cpu", "transformers.eval_steps": "0",
                                "transformers.logging_steps": "1", "transformers.max_new_tokens": "4",
                                "transformers.max_seq_length": "4096", "transformers.target_modules": "q_proj,v_proj"})

    def failure() -> None:  # a record without its messages: the trainer itself reports failure
        (prepared / "transformers" / "train.jsonl").write_text('{"messages": []}\n', encoding="utf-8")

    return Harness(get_provider("transformers", config), str(model), failure, 0.2)


@pytest.fixture(params=["local", "openai", "vertex", "transformers", "together"])
def harness(request, monkeypatch, prepared) -> Harness:
    with ExitStack() as stack:
        yield {"local": _local, "openai": _openai, "vertex": _vertex,
               "transformers": _transformers, "together": _together}[request.param](stack, monkeypatch, prepared)


def tuning_request(harness: Harness, prepared: Path, run_id: str = "contract-run") -> TuningRequest:
    return TuningRequest(run_id=run_id, base_model=harness.base_model, prepared_dir=prepared, epochs=1,
                         learning_rate={"local": 0.01, "transformers": 0.001, "together": 0.0001}.get(harness.provider.name, 1.0), batch_size=0, seed=0,
                         suffix="contract")


def follow(provider: Provider, job_id: str, pause: float):
    """Poll like tune does: state first, then metrics after the cursor; returns (final job, points, cursor)."""
    points, cursor = [], None
    deadline = time.monotonic() + 120  # a trainer process that imports torch needs time on a busy machine
    while True:
        job = provider.get_job(job_id)
        page = provider.read_metrics(job_id, cursor)
        points += page.points
        cursor = page.next_cursor
        if job.state in TERMINAL_STATES:
            return job, points, cursor
        assert time.monotonic() < deadline, f"{provider.name} job never finished"
        time.sleep(pause)


def test_a_job_succeeds_with_a_curve_read_once(harness, prepared):
    provider = harness.provider
    assert isinstance(provider, Provider)
    report = provider.preflight(tuning_request(harness, prepared))
    assert report.n_train == 40 and report.estimated_billed_tokens > 0
    job = provider.start_job(tuning_request(harness, prepared))
    assert job.job_id and job.state in set(JobState)
    final, points, cursor = follow(provider, job.job_id, harness.pause)
    assert final.state is JobState.SUCCEEDED and final.tuned_model
    train = [p for p in points if p.key == "train_loss"]
    assert train, "every provider reports train_loss"
    assert [p.step for p in train] == sorted({p.step for p in train})  # ascending, no step twice
    assert all(p.timestamp_ms > 0 for p in points)
    assert {p.key for p in points} & {"val_loss"}, "validation loss under the shared key"
    assert provider.read_metrics(job.job_id, cursor).points == []
    assert job.job_id in list(provider.list_jobs())


def test_a_second_start_for_the_same_run_does_not_create_a_second_job(harness, prepared):
    first = harness.provider.start_job(tuning_request(harness, prepared, run_id="same-run"))
    follow(harness.provider, first.job_id, harness.pause)
    second = harness.provider.start_job(tuning_request(harness, prepared, run_id="same-run"))
    assert second.job_id == first.job_id


def test_a_failed_job_carries_the_provider_error(harness, prepared):
    harness.script_failure()
    job = harness.provider.start_job(tuning_request(harness, prepared, run_id="failing-run"))
    final, _, _ = follow(harness.provider, job.job_id, harness.pause)
    assert final.state is JobState.FAILED
    assert final.error_message


def test_predict_measures_one_request(harness):
    prediction = harness.provider.predict(harness.base_model, "Who won Super Bowl 50?",
                                          "The Denver Broncos defeated the Carolina Panthers to win Super Bowl 50.")
    assert isinstance(prediction, Prediction) and prediction.text
    assert prediction.latency_ms >= 0 and prediction.attempts >= 1

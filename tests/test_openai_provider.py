"""OpenAIProvider against the in-process fake OpenAI server, through the real `openai` client."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from finetune_mlflow.providers.openai import data as openai_data
from finetune_mlflow.config import Config, EvaluateConfig, OpenAIConfig, TuneConfig
from finetune_mlflow.costing import check_cost_limit
from finetune_mlflow.errors import ConfigError, DataError, ProviderError, TrainingClosed
from finetune_mlflow.providers.openai.data import to_openai_chat
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt
from finetune_mlflow.providers.base import JobState, Provider, TuningRequest
from finetune_mlflow.providers.openai.provider import OpenAIProvider
from finetune_mlflow.providers.retry import RetryPolicy

from tests.fakes.openai_server import FakeOpenAI, JobScript

API_KEY = "sk-test-abcdefghijklmnopqrstuvwxyz0123456789"
BASE_MODEL = "gpt-4o-mini-2024-07-18"


class Sleeps(list):
    """A sleep that records how long it was asked to wait and returns at once."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(autouse=True)
def openai_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    for var in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_ADMIN_KEY", "OPENAI_CUSTOM_HEADERS",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def sleeps():
    return Sleeps()


def make_config(server: FakeOpenAI, *, max_cost_usd: float = 0.0, timeout: float = 5.0, request_retries: int = 2,
                max_retries: int = 2, context_limit: int = 65536, prices: dict | None = None) -> Config:
    return Config(
        tune=TuneConfig(provider="openai", base_model=BASE_MODEL, epochs=3, learning_rate=1.8, max_cost_usd=max_cost_usd),
        evaluate=EvaluateConfig(max_concurrency=3, max_output_tokens=16, request_retries=request_retries),
        openai=OpenAIConfig(base_url=server.base_url, max_retries=max_retries, request_timeout_seconds=timeout,
                            context_limit_tokens=context_limit,
                            training_price_per_million_tokens={BASE_MODEL: 3.00} if prices is None else prices),
    )


@pytest.fixture
def make_provider(server, sleeps):
    made = []

    def make(**config_kwargs) -> OpenAIProvider:
        provider = OpenAIProvider(make_config(server, **config_kwargs), sleep=sleeps)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def write_prepared(root: Path, n_train: int = 20, n_validation: int = 5) -> Path:
    prepared = root / "prepared"
    (prepared / "openai").mkdir(parents=True)
    for split, n in (("train", n_train), ("validation", n_validation)):
        if n:
            lines = [json.dumps(to_openai_chat({"question": f"Q{i}?", "context": f"Passage {i} about Ann.",
                                                "answers": ["Ann"]})) for i in range(n)]
            (prepared / "openai" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return prepared


def make_request(prepared: Path, **overrides) -> TuningRequest:
    values = dict(run_id="run123", base_model=BASE_MODEL, prepared_dir=prepared, epochs=3, learning_rate=1.8,
                  batch_size=0, seed=7, suffix="squad")
    values.update(overrides)
    return TuningRequest(**values)


def expected_points(server: FakeOpenAI, job_id: str) -> list[tuple]:
    out = []
    for event in server.metric_events_of(job_id):
        for p in openai_data.metrics_from_data(event["data"], event["created_at"] * 1000):
            out.append((p.key, p.value, p.step, p.timestamp_ms))
    return sorted(out, key=lambda t: (t[2], t[3], t[0]))


def as_tuples(points) -> list[tuple]:
    return [(p.key, p.value, p.step, p.timestamp_ms) for p in points]


# ------------------------------------------------------------------------------------------------ construction


def test_is_a_provider_and_missing_key_is_a_config_error(make_provider, monkeypatch, server):
    provider = make_provider()
    assert isinstance(provider, Provider)
    assert provider.name == "openai" and provider.max_concurrency == 3
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set.*export OPENAI_API_KEY"):
        OpenAIProvider(make_config(server))


def test_base_url_from_env_and_credential_source_logged(server, monkeypatch, caplog, sleeps):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secretish")
    caplog.set_level(logging.INFO, logger="finetune_mlflow")
    config = Config(openai=OpenAIConfig(base_url=""))
    provider = OpenAIProvider(config, sleep=sleeps)
    try:
        assert provider.predict("gpt-4o-mini", "Who?", "Ann did.").text == "fake answer"
    finally:
        provider.close()
    text = caplog.text
    assert "api key from env OPENAI_API_KEY" in text and "env OPENAI_BASE_URL" in text
    assert "organization from env OPENAI_ORG_ID" in text
    assert API_KEY not in text and "org-secretish" not in text


# ------------------------------------------------------------------------------------------------ preflight


def test_preflight_estimates_tokens_and_cost(tmp_path, make_provider):
    prepared = write_prepared(tmp_path, n_train=20, n_validation=5)
    report = make_provider().preflight(make_request(prepared))
    examples = openai_data.load_chat_jsonl(prepared / "openai" / "train.jsonl")
    tokens = sum(openai_data.estimate_example_tokens(e) for e in examples)
    assert (report.n_train, report.n_validation) == (20, 5)
    assert report.estimated_train_tokens == tokens
    assert report.estimated_billed_tokens == tokens * 3
    assert report.estimated_cost_usd == pytest.approx(tokens * 3 / 1e6 * 3.00)
    assert any("recommends" in w for w in report.warnings)


def test_preflight_warns_over_context_limit_and_unknown_price(tmp_path, make_provider):
    prepared = write_prepared(tmp_path, n_validation=0)
    report = make_provider(context_limit=20).preflight(make_request(prepared, base_model="my-custom-base"))
    assert report.n_validation == 0 and report.estimated_cost_usd is None
    assert any("20 training examples exceed openai.context_limit_tokens=20" in w for w in report.warnings)
    assert any("no price for my-custom-base" in w for w in report.warnings)


def guard(report, limit: float, model: str = "") -> None:
    check_cost_limit(report.estimated_cost_usd, limit, what="the job", price_key="openai.training_price_per_million_tokens",
                     unpriced=model)


def test_preflight_cost_guard(tmp_path, make_provider, server):
    prepared = write_prepared(tmp_path)
    with pytest.raises(ConfigError, match=r"estimated cost \$.* exceeds max_cost_usd=\$1e-06"):
        guard(make_provider().preflight(make_request(prepared)), 0.000001)
    with pytest.raises(ConfigError, match="cannot be estimated: no price for my-base under "
                                          "openai.training_price_per_million_tokens"):
        guard(make_provider().preflight(make_request(prepared, base_model="my-base")), 5, "my-base")
    ok = make_provider(prices={"my-base": 1.0}).preflight(make_request(prepared, base_model="my-base"))
    guard(ok, 5)
    assert ok.estimated_cost_usd is not None and ok.estimated_cost_usd < 5
    assert server.requests == []  # preflight never touches the network


def test_preflight_data_error_names_line(tmp_path, make_provider):
    prepared = write_prepared(tmp_path)
    path = prepared / "openai" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        make_provider().preflight(make_request(prepared))
    assert info.value.line == 4 and "no assistant message" in info.value.reason


# ------------------------------------------------------------------------------------------------ jobs


def test_happy_path_job_metrics_step_for_step(tmp_path, make_provider, server):
    # 250 metric events: more than one events page (100), revealed over several polls.
    server.script_next_job(JobScript(statuses=["validating_files", "queued", "running", "running", "running",
                                               "running", "succeeded"], n_steps=250, valid_every=10))
    provider = make_provider()
    prepared = write_prepared(tmp_path)
    started = provider.start_job(make_request(prepared))
    assert started.state is JobState.PENDING and started.provider_status == "validating_files"

    assert len(server.created_jobs) == 1
    body = server.created_jobs[0]
    assert body["model"] == BASE_MODEL and body["suffix"] == "squad" and body["seed"] == 7
    assert body["metadata"] == {"mlflow_run_id": "run123"}
    assert body["method"] == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 1.8}}}
    assert [u["purpose"] for u in server.uploads] == ["fine-tune", "fine-tune"]
    assert body["training_file"] == server.uploads[0]["id"] and body["validation_file"] == server.uploads[1]["id"]
    assert server.uploads[0]["content"] == (prepared / "openai" / "train.jsonl").read_bytes()

    cursor, collected, saved = None, [], None
    states = []
    for poll in range(20):
        job = provider.get_job(started.job_id)
        states.append(job.provider_status)
        page = provider.read_metrics(started.job_id, cursor)
        collected.extend(page.points)
        cursor = page.next_cursor
        if poll == 2:
            saved, collected_at_save = cursor, len(collected)
            assert 0 < collected_at_save < len(expected_points(server, started.job_id)) + 1
        if job.state.value in ("succeeded", "failed", "cancelled"):
            break
    assert states == ["queued", "running", "running", "running", "running", "succeeded"]
    # Extra polls after the end add nothing.
    again = provider.read_metrics(started.job_id, cursor)
    assert again.points == [] and again.next_cursor == cursor

    expected = expected_points(server, started.job_id)
    assert len({(p.key, p.step) for p in collected}) == len(collected)  # no duplicates
    assert sorted(as_tuples(collected), key=lambda t: (t[2], t[3], t[0])) == expected
    assert max(p.step for p in collected) == 250
    assert {p.key for p in collected} >= {"train_loss", "val_loss", "train_mean_token_accuracy",
                                          "valid_mean_token_accuracy", "full_valid_loss"}
    # Re-reading from a saved cursor returns exactly what came after it; from None, everything, in step order.
    assert as_tuples(provider.read_metrics(started.job_id, saved).points) == \
        sorted(as_tuples(collected[collected_at_save:]), key=lambda t: (t[2], t[3], t[0]))
    full = provider.read_metrics(started.job_id, None).points
    assert as_tuples(full) == expected and [p.step for p in full] == sorted(p.step for p in full)

    final = provider.get_job(started.job_id)
    assert final.state is JobState.SUCCEEDED
    assert final.tuned_model and final.tuned_model.startswith(f"ft:{BASE_MODEL}:")
    assert final.metrics["trained_tokens"] == 12345
    assert final.metrics["full_valid_loss"] == pytest.approx(2.1 / 250)
    assert "full_valid_mean_token_accuracy" in final.metrics
    assert json.loads(final.tags["openai.hyperparameters"]) == {
        "batch_size": 1, "learning_rate_multiplier": 1.8, "n_epochs": 3}
    assert "ckpt-step-83" in final.tags["openai.checkpoints"] and "ckpt-step-167" in final.tags["openai.checkpoints"]
    assert final.tags["openai.result_files"].startswith("file-")
    assert len(server.created_jobs) == 1  # polling never creates anything


def test_lost_create_response_adopts_the_created_job(tmp_path, make_provider, server, sleeps):
    server.inject(r"/v1/fine_tuning/jobs$", method="POST", status=500, after_handling=True)
    provider = make_provider()
    job = provider.start_job(make_request(write_prepared(tmp_path)))
    assert len(server.jobs) == 1 and len(server.created_jobs) == 1
    assert job.job_id == next(iter(server.jobs))
    assert len(sleeps) == 1


def test_failed_job_reports_error(tmp_path, make_provider, server):
    server.script_next_job(JobScript(statuses=["validating_files", "failed"], error={
        "code": "invalid_training_file", "message": "Line 3 has no assistant message.", "param": "training_file"}))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    job = provider.get_job(job_id)
    assert job.state is JobState.FAILED and job.provider_status == "failed"
    assert job.error_code == "invalid_training_file"
    assert job.error_message == "Line 3 has no assistant message. (param: training_file)"
    assert job.tuned_model is None
    assert provider.read_metrics(job_id, None).points == []


def test_cancelled_job(tmp_path, make_provider, server):
    server.script_next_job(JobScript(statuses=["validating_files", "queued", "running", "cancelled"], n_steps=4))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    seen = [provider.get_job(job_id).state for _ in range(4)]
    assert seen == [JobState.PENDING, JobState.RUNNING, JobState.CANCELLED, JobState.CANCELLED]
    final = provider.get_job(job_id)
    assert final.tuned_model is None and final.error_code is None
    assert [p.step for p in provider.read_metrics(job_id, None).points if p.key == "train_loss"] == [1, 2, 3, 4]


def test_permission_denied_explains_phase_out(tmp_path, make_provider, server, sleeps):
    server.deny_job_creation()
    provider = make_provider()
    with pytest.raises(ProviderError) as info:
        provider.start_job(make_request(write_prepared(tmp_path)))
    message = str(info.value)
    assert info.value.status == 403 and info.value.request_id and not info.value.retryable
    assert isinstance(info.value, TrainingClosed) and "\n" not in message
    assert "does not accept new fine-tuning jobs on" in message and "-e migrate" in message
    assert "403 permission_denied: You do not have access" in message
    assert server.created_jobs == [] and sleeps == []
    assert server.uploads and not server.files and sorted(server.deleted_files) == sorted(u["id"] for u in server.uploads)
    assert sum(1 for m, p, _, _ in server.requests if m == "POST" and p == "/v1/fine_tuning/jobs") == 1


def test_unknown_job_is_not_retried(make_provider, sleeps):
    with pytest.raises(ProviderError) as info:
        make_provider().get_job("ftjob-missing")
    assert info.value.status == 404 and not info.value.retryable and sleeps == []
    assert "fine_tuning.jobs.retrieve(ftjob-missing)" in str(info.value)


def test_metric_polls_retry_server_errors(tmp_path, make_provider, server, sleeps):
    server.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=3))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    server.inject(r"/v1/fine_tuning/jobs/[^/]+/events$", status=503, retry_after="1.5")
    page = provider.read_metrics(job_id, None)
    assert sleeps == [1.5]
    assert as_tuples(page.points) == expected_points(server, job_id)


def test_cursor_of_vanished_event_falls_back_to_step(tmp_path, make_provider, server):
    server.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=5, valid_every=0, full_valid=False))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    provider.get_job(job_id)
    page = provider.read_metrics(job_id, "ftevent-gone|3")
    assert sorted({p.step for p in page.points}) == [4, 5]
    assert page.next_cursor.endswith("|5")


@pytest.mark.parametrize("encoding", ["base64", "plain"])
def test_result_file_metrics(tmp_path, make_provider, server, encoding):
    server.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=6, result_file_encoding=encoding))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    job = provider.get_job(job_id)
    assert job.state is JobState.SUCCEEDED
    from_file = provider.result_file_metrics(job_id)
    from_events = provider.read_metrics(job_id, None).points
    assert [(p.key, p.value, p.step) for p in from_file] == \
        sorted(((p.key, p.value, p.step) for p in from_events), key=lambda t: (t[2], t[0]))
    finished = server.jobs[job_id].obj["finished_at"]
    assert {p.timestamp_ms for p in from_file} == {finished * 1000}


def test_checkpoints_are_usable_models_with_step_epoch_and_metrics(tmp_path, make_provider, server):
    """The last three epochs' checkpoints through the real client's paginated list, oldest first, with the metrics
    at their step under the shared keys; the last one is the final model itself."""
    server.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=40, valid_every=5))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path), epochs=4)).job_id
    final = provider.get_job(job_id)
    checkpoints = provider.checkpoints(job_id)
    assert [(c.step, c.epoch) for c in checkpoints] == [(20, 2), (30, 3), (40, 4)]
    assert [c.model for c in checkpoints[:2]] == [f"{final.tuned_model}:ckpt-step-20",
                                                  f"{final.tuned_model}:ckpt-step-30"]
    assert checkpoints[-1].model == final.tuned_model
    assert all(c.checkpoint_id.startswith("ftckpt_") for c in checkpoints)
    assert checkpoints[0].metrics["val_loss"] == pytest.approx(2.2 / 20)
    assert checkpoints[-1].metrics["full_valid_loss"] == pytest.approx(2.1 / 40)
    assert final.metrics["billed_training_tokens"] == final.metrics["trained_tokens"] == 12345


def test_job_without_full_valid_metrics(tmp_path, make_provider, server):
    # No full_valid_* in events, checkpoints or result file: nothing to report, and no error.
    server.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=4, full_valid=False))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    job = provider.get_job(job_id)
    assert "full_valid_loss" not in job.metrics and job.metrics["trained_tokens"] == 12345


def test_list_jobs_follows_pagination(make_provider, server):
    ids = [server.add_job(JobScript(statuses=["succeeded"])) for _ in range(205)]
    listed = list(make_provider().list_jobs())
    assert listed == list(reversed(ids))  # newest first, every job exactly once
    pages = [q for m, p, q, _ in server.requests if p == "/v1/fine_tuning/jobs"]
    assert len(pages) == 3 and "after" not in pages[0] and pages[1]["after"] == [listed[99]]


# ------------------------------------------------------------------------------------------------ predict


def test_predict_sends_shared_prompt_and_reads_usage(make_provider, server):
    server.chat_responder = lambda body: '  "Ann"\nbecause the passage says so'
    prediction = make_provider().predict("ft:gpt-4o-mini-2024-07-18:org:squad:abc", "Who wrote it?", "Ann wrote it.")
    assert prediction.text == "Ann"
    assert prediction.attempts == 1 and prediction.retry_wait_ms == 0
    assert prediction.input_tokens > 0 and prediction.output_tokens > 0
    sent = server.chat_requests[0]
    assert sent["model"] == "ft:gpt-4o-mini-2024-07-18:org:squad:abc"
    assert sent["messages"] == [{"role": "system", "content": SYSTEM_INSTRUCTION},
                                {"role": "user", "content": user_prompt("Who wrote it?", "Ann wrote it.")}]
    assert sent["temperature"] == 0 and sent["max_completion_tokens"] == 16 and "max_tokens" not in sent


def test_predict_honours_retry_after_and_excludes_wait_from_latency(make_provider, server, sleeps):
    server.inject("/v1/chat/completions", status=429, retry_after="2")
    prediction = make_provider().predict(BASE_MODEL, "Who?", "Ann did.")
    assert prediction.attempts == 2
    assert sleeps == [2.0] and prediction.retry_wait_ms == pytest.approx(2000.0)
    assert prediction.latency_ms < 2000.0
    assert len(server.chat_requests) == 1  # the 429 never reached the model


def test_predict_retry_after_ms_header(make_provider, server, sleeps):
    server.inject("/v1/chat/completions", status=429, retry_after_ms="250", retry_after="9")
    assert make_provider().predict(BASE_MODEL, "Who?", "Ann did.").attempts == 2
    assert sleeps == [0.25]


def test_predict_500_then_success(make_provider, server, sleeps):
    server.inject_sequence("/v1/chat/completions", [500, None])
    prediction = make_provider().predict(BASE_MODEL, "Who?", "Ann did.")
    assert prediction.attempts == 2 and prediction.text == "fake answer"
    assert sleeps == [RetryPolicy().initial_backoff_s]


def test_predict_retry_budget_exhausted(make_provider, server, sleeps):
    server.inject("/v1/chat/completions", status=503, times=None)
    with pytest.raises(ProviderError) as info:
        make_provider(request_retries=2).predict(BASE_MODEL, "Who?", "Ann did.")
    message = str(info.value)
    assert f"chat.completions.create(model={BASE_MODEL}) failed after 3 attempts" in message
    assert "HTTP 503" in message and info.value.status == 503 and info.value.request_id
    assert len(sleeps) == 2


def test_predict_insufficient_quota_is_not_retried(make_provider, server, sleeps):
    server.inject("/v1/chat/completions", status=429, retry_after="1", body={"error": {
        "message": "You exceeded your current quota.", "type": "insufficient_quota", "param": None,
        "code": "insufficient_quota"}})
    with pytest.raises(ProviderError, match="out of quota") as info:
        make_provider().predict(BASE_MODEL, "Who?", "Ann did.")
    assert not info.value.retryable and sleeps == []


def test_predict_timeout_is_retried(make_provider, server, sleeps):
    server.inject("/v1/chat/completions", status=None, delay_s=0.6)
    prediction = make_provider(timeout=0.2).predict(BASE_MODEL, "Who?", "Ann did.")
    assert prediction.attempts == 2 and len(sleeps) == 1
    assert prediction.latency_ms < 600


def test_secrets_never_appear_in_errors_or_logs(make_provider, server, caplog):
    caplog.set_level(logging.DEBUG, logger="finetune_mlflow")
    server.inject("/v1/chat/completions", status=401, body={"error": {
        "message": f"Incorrect API key provided: {API_KEY}.", "type": "invalid_request_error", "param": None,
        "code": "invalid_api_key"}})
    with pytest.raises(ProviderError) as info:
        make_provider().predict(BASE_MODEL, "Who?", "Ann did.")
    assert info.value.status == 401 and "check OPENAI_API_KEY" in str(info.value)
    assert API_KEY not in str(info.value) and API_KEY not in caplog.text
    assert "Incorrect API key provided: ***." in str(info.value)


def test_concurrent_predictions_with_random_faults(make_provider, server, sleeps):
    from concurrent.futures import ThreadPoolExecutor

    fault = server.inject("/v1/chat/completions", status=503, times=None, fraction=0.4)
    provider = make_provider(request_retries=20)
    with ThreadPoolExecutor(max_workers=provider.max_concurrency) as pool:
        predictions = list(pool.map(lambda i: provider.predict(BASE_MODEL, f"Q{i}?", "Ann did."), range(12)))
    assert all(p.text == "fake answer" for p in predictions)
    assert sum(p.attempts - 1 for p in predictions) == fault.fired == len(sleeps)
    assert len(server.chat_requests) == 12 and server.handler_errors == []

"""VertexProvider against the in-process fake, through the real google-genai, google-cloud-storage and
google-auth clients: nothing of ours or of the SDKs is patched; only 127.0.0.1 is contacted."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import pytest

from finetune_mlflow.config import Config, EvaluateConfig, TuneConfig, VertexConfig
from finetune_mlflow.costing import check_cost_limit
from finetune_mlflow.errors import ConfigError, DataError, ProviderError
from finetune_mlflow.providers.vertex.data import to_gemini
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, Provider, TuningRequest
from finetune_mlflow.providers.retry import RetryPolicy
from finetune_mlflow.providers.vertex.provider import SERIES_KEYS, VertexProvider
from tests.fakes.vertex_server import FakeVertexServer, JobScript

TOKEN = "ya29.fake-static-token-for-tests"
PROJECT = "test-project"
BUCKET = "stage-bucket"
RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def fake():
    with FakeVertexServer(project=PROJECT) as server:
        server.expected_token = TOKEN
        yield server


@pytest.fixture(autouse=True)
def token_env(monkeypatch):
    monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", TOKEN)
    for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "FINETUNE_VERTEX_STAGING_BUCKET"):
        monkeypatch.delenv(name, raising=False)


def make_config(fake: FakeVertexServer, *, tune: dict | None = None, vertex: dict | None = None) -> Config:
    return Config(
        tune=TuneConfig(provider="vertex", base_model="gemini-2.5-flash", epochs=2, learning_rate=1.0, **(tune or {})),
        evaluate=EvaluateConfig(max_concurrency=3, request_retries=3, max_output_tokens=16),
        vertex=dataclasses.replace(
            VertexConfig(project=PROJECT, location="us-central1", staging_bucket=BUCKET,
                         api_endpoint=fake.url, storage_endpoint=fake.url,
                         training_price_per_million_tokens={"gemini-2.5-flash": 5.0}),
            **(vertex or {}),
        ),
    )


class Sleeps:
    """Records requested waits; optionally really waits a little so latency-vs-wait can be checked."""

    def __init__(self, real: float = 0.0):
        self.calls: list[float] = []
        self.real = real

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.real:
            time.sleep(self.real)


def make_provider(fake, sleeps=None, **kwargs) -> VertexProvider:
    return VertexProvider(make_config(fake, **kwargs), sleep=sleeps or Sleeps(),
                          retry_policy=RetryPolicy(max_attempts=4, initial_backoff_s=0.5))


EXAMPLES = [
    {"question": f"Question {i}?", "context": f"Passage number {i} says the answer is A{i}.", "answers": [f"A{i}"]}
    for i in range(6)
]


@pytest.fixture
def prepared(tmp_path) -> Path:
    gemini = tmp_path / "prepared" / "vertex"
    gemini.mkdir(parents=True)
    (gemini / "train.jsonl").write_text("".join(json.dumps(to_gemini(e)) + "\n" for e in EXAMPLES[:4]))
    (gemini / "validation.jsonl").write_text("".join(json.dumps(to_gemini(e)) + "\n" for e in EXAMPLES[4:]))
    return tmp_path / "prepared"


def request_for(prepared: Path, run_id: str = RUN_ID, **overrides) -> TuningRequest:
    values = dict(run_id=run_id, base_model="gemini-2.5-flash", prepared_dir=prepared, epochs=2,
                  learning_rate=1.0, batch_size=0, seed=0, suffix="squad")
    values.update(overrides)
    return TuningRequest(**values)


def poll(provider: VertexProvider, job_id: str, cursor: str | None = None, max_polls: int = 50):
    """What the tune step does: get_job then read_metrics each poll until terminal."""
    points, cursors = [], []
    for _ in range(max_polls):
        job = provider.get_job(job_id)
        page = provider.read_metrics(job_id, cursor)
        points.extend(page.points)
        cursor = page.next_cursor
        cursors.append(cursor)
        if job.state in TERMINAL_STATES:
            page = provider.read_metrics(job_id, cursor)  # whatever landed with the final state
            points.extend(page.points)
            return job, points, page.next_cursor
    raise AssertionError("job never finished")


def histories(points) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for p in points:
        out.setdefault(p.key, []).append((p.step, p.value))
    return out


def expected_histories(fake, job_id) -> dict[str, list[tuple[int, float]]]:
    served = fake.served_series(job_id)
    return {key: served[display] for display, key in SERIES_KEYS.items()}


# ----------------------------------------------------------------------------------------------- happy path
def test_happy_path_one_job_uploads_and_curves(fake, prepared):
    # The experiment shows up on the second poll (read_metrics' own job read counts as the first).
    fake.script_next_job(JobScript(experiment_from_poll=2))
    provider = make_provider(fake)
    assert isinstance(provider, Provider)
    assert provider.name == "vertex" and provider.max_concurrency == 3

    report = provider.preflight(request_for(prepared))
    assert (report.n_train, report.n_validation) == (4, 2)
    assert report.estimated_billed_tokens == 2 * report.estimated_train_tokens > 0
    assert report.estimated_cost_usd == pytest.approx(report.estimated_billed_tokens / 1e6 * 5.0)
    assert fake.requests == []  # preflight is local

    started = provider.start_job(request_for(prepared))
    assert len(fake.created_jobs) == 1
    assert started.job_id == fake.job_names()[0]
    assert started.job_id.startswith(f"projects/{PROJECT}/locations/us-central1/tuningJobs/")
    assert started.state == JobState.PENDING

    # Data landed in the fake bucket under <prefix>/<run_id>/, byte for byte.
    prefix = f"finetune-mlflow/{RUN_ID}"
    assert set(fake.objects) == {(BUCKET, f"{prefix}/train.jsonl"), (BUCKET, f"{prefix}/validation.jsonl")}
    assert fake.objects[(BUCKET, f"{prefix}/train.jsonl")] == (prepared / "vertex" / "train.jsonl").read_bytes()
    assert fake.objects[(BUCKET, f"{prefix}/validation.jsonl")] == (prepared / "vertex" / "validation.jsonl").read_bytes()
    assert {kind for _, _, kind in fake.uploads} == {"multipart"}

    # The create request the real SDK sent.
    body = fake.created_jobs[0]
    assert body["baseModel"] == "gemini-2.5-flash"
    spec = body["supervisedTuningSpec"]
    assert spec["trainingDatasetUri"] == f"gs://{BUCKET}/{prefix}/train.jsonl"
    assert spec["validationDatasetUri"] == f"gs://{BUCKET}/{prefix}/validation.jsonl"
    assert spec["hyperParameters"] == {"epochCount": 2, "learningRateMultiplier": 1.0, "adapterSize": "ADAPTER_SIZE_FOUR"}
    assert body["labels"] == {"mlflow_run_id": RUN_ID}
    assert body["tunedModelDisplayName"] == f"squad-{RUN_ID}"

    # Before the job has an experiment there is nothing to read (and no TensorBoard call).
    empty = provider.read_metrics(started.job_id, None)
    assert empty.points == [] and empty.next_cursor is None
    assert not any("tensorboards" in path or "metadataStores" in path for _, path in fake.requests)

    job, points, _ = poll(provider, started.job_id)
    assert job.state == JobState.SUCCEEDED and job.provider_status == "JOB_STATE_SUCCEEDED"
    assert job.tuned_model.startswith(f"projects/{PROJECT}/locations/us-central1/endpoints/")
    assert job.tags["vertex.model"].startswith(f"projects/{PROJECT}/locations/us-central1/models/")
    assert job.tags["vertex.experiment"].endswith("/metadataStores/default/contexts/tuning-experiment-" +
                                                  job.job_id.rsplit("/", 1)[-1])
    assert job.metrics["tuning_dataset_example_count"] == 4
    assert job.metrics["total_billable_token_count"] == 4 * 100  # tokens in the dataset
    assert job.metrics["billed_training_tokens"] == 4 * 100 * 2  # billed per epoch
    # Supervised jobs report no completedStepCount (multi-step RL only): the total comes from tuningDataStats.
    assert "completed_step_count" not in job.metrics and job.total_steps == 8
    assert job.error_code is None
    # One checkpoint per epoch, each on its own endpoint; the last one is the tuned model's endpoint.
    checkpoints = provider.checkpoints(started.job_id)
    assert [(c.checkpoint_id, c.epoch, c.step) for c in checkpoints] == [("1", 1, 4), ("2", 2, 8)]
    assert checkpoints[-1].model == job.tuned_model and checkpoints[0].model != job.tuned_model
    assert checkpoints[0].model.startswith(f"projects/{PROJECT}/locations/us-central1/endpoints/")

    keys = [(p.key, p.step) for p in points]
    assert len(keys) == len(set(keys)), "a point was returned twice"
    assert histories(points) == expected_histories(fake, job.job_id)
    assert all(p.timestamp_ms > 0 for p in points)
    assert len(fake.created_jobs) == 1
    # Every request carried the static token.
    assert set(fake.auth_headers) == {f"Bearer {TOKEN}"}


def test_metrics_resume_from_saved_cursor_in_a_new_process(fake, prepared):
    fake.auto_advance = False  # the test moves the job along explicitly
    first = make_provider(fake)
    job_id = first.start_job(request_for(prepared)).job_id
    fake.advance(job_id, 2)
    page = first.read_metrics(job_id, None)
    assert page.points, "some points should be visible mid-run"
    saved = page.next_cursor
    assert json.loads(saved)  # a plain JSON string, storable as a run tag

    # A fresh provider (no caches) continues from the cursor: no point twice, nothing missing.
    second = make_provider(fake)
    again = second.read_metrics(job_id, saved)
    assert again.points == [] and json.loads(again.next_cursor) == json.loads(saved)
    fake.advance(job_id)
    more = second.read_metrics(job_id, saved)
    assert more.points and all(p.step > json.loads(saved)[p.key] for p in more.points)
    fake.advance(job_id, 10)  # to the end of the script
    last = second.read_metrics(job_id, more.next_cursor)
    assert second.get_job(job_id).state == JobState.SUCCEEDED
    assert second.read_metrics(job_id, last.next_cursor).points == []
    everything = page.points + more.points + last.points
    keys = [(p.key, p.step) for p in everything]
    assert len(keys) == len(set(keys))
    assert histories(everything) == expected_histories(fake, job_id)


def test_start_job_twice_for_one_run_reattaches(fake, prepared):
    provider = make_provider(fake)
    first = provider.start_job(request_for(prepared))
    second = make_provider(fake).start_job(request_for(prepared))
    assert second.job_id == first.job_id
    assert len(fake.created_jobs) == 1
    other = provider.start_job(request_for(prepared, run_id="ffffffffffffffffffffffffffffffff"))
    assert other.job_id != first.job_id and len(fake.created_jobs) == 2


def test_list_jobs_follows_pages(fake, prepared):
    provider = make_provider(fake)
    for i in range(3):
        provider.start_job(request_for(prepared, run_id=f"{i:032x}"))
    assert fake.list_page_size < 3
    assert list(provider.list_jobs()) == fake.job_names()


# ----------------------------------------------------------------------------------------------- failures
def test_failed_job_reports_provider_error(fake, prepared):
    fake.script_next_job(JobScript(
        states=["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_FAILED"],
        error={"code": 3, "message": "Dataset row 7 has no model turn."},
    ))
    provider = make_provider(fake)
    job_id = provider.start_job(request_for(prepared)).job_id
    job, points, _ = poll(provider, job_id)
    assert job.state == JobState.FAILED
    assert (job.error_code, job.error_message) == ("3", "Dataset row 7 has no model turn.")
    assert job.tuned_model is None
    assert histories(points) == expected_histories(fake, job_id)  # curves up to the failure are kept


def test_cancelled_job(fake, prepared):
    fake.script_next_job(JobScript(states=["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_CANCELLED"],
                                   error={"code": 1, "message": "Cancelled by user."}))
    provider = make_provider(fake)
    job_id = provider.start_job(request_for(prepared)).job_id
    job, _, _ = poll(provider, job_id)
    assert job.state == JobState.CANCELLED and job.provider_status == "JOB_STATE_CANCELLED"
    assert job.error_code == "1" and job.tuned_model is None


def test_batch_size_is_a_config_error_before_any_http(fake):
    with pytest.raises(ConfigError) as info:
        VertexProvider(make_config(fake, tune={"batch_size": 8}))
    assert "tune.batch_size" in str(info.value) and "batch_size: 0" in str(info.value)
    assert fake.requests == []


def test_bad_adapter_size_and_missing_bucket(fake, prepared):
    with pytest.raises(ConfigError, match="vertex.adapter_size"):
        VertexProvider(make_config(fake, vertex={"adapter_size": 3}))
    provider = make_provider(fake, vertex={"staging_bucket": ""})
    with pytest.raises(ConfigError, match="FINETUNE_VERTEX_STAGING_BUCKET"):
        provider.start_job(request_for(prepared))
    assert fake.requests == []


def test_staging_bucket_from_env(fake, prepared, monkeypatch):
    monkeypatch.setenv("FINETUNE_VERTEX_STAGING_BUCKET", "gs://env-bucket")
    provider = make_provider(fake, vertex={"staging_bucket": ""})
    provider.start_job(request_for(prepared))
    assert {bucket for bucket, _ in fake.objects} == {"env-bucket"}


def test_data_errors_name_the_line_before_any_http(fake, prepared):
    train = prepared / "vertex" / "train.jsonl"
    lines = train.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["contents"][1]["role"] = "user"
    lines[2] = json.dumps(bad)
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        make_provider(fake).preflight(request_for(prepared))
    assert info.value.line == 3 and info.value.path == str(train)
    assert fake.requests == []


def test_validation_limit_and_cost_guard(fake, prepared):
    with pytest.raises(DataError, match="max_validation_examples"):
        make_provider(fake, vertex={"max_validation_examples": 1}).preflight(request_for(prepared))
    price_key = "vertex.training_price_per_million_tokens"
    with pytest.raises(ConfigError, match="exceeds max_cost_usd"):
        check_cost_limit(make_provider(fake).preflight(request_for(prepared)).estimated_cost_usd, 1e-9, what="x",
                         price_key=price_key)
    # Flash-Lite is not priced as Flash (its longest-prefix entry): no exact entry, no estimate, the guard refuses.
    lite = make_provider(fake).preflight(request_for(prepared, base_model="gemini-2.5-flash-lite"))
    assert lite.estimated_cost_usd is None
    assert any("no price for gemini-2.5-flash-lite" in w for w in lite.warnings)
    with pytest.raises(ConfigError, match="no price for gemini-2.5-flash-lite under "
                                          "vertex.training_price_per_million_tokens"):
        check_cost_limit(lite.estimated_cost_usd, 5.0, what="x", price_key=price_key, unpriced="gemini-2.5-flash-lite")
    report = make_provider(fake, vertex={"training_price_per_million_tokens": {"gemini-2.5-flash-lite": 2.0}}).preflight(
        request_for(prepared, base_model="gemini-2.5-flash-lite"))
    check_cost_limit(report.estimated_cost_usd, 5.0, what="x", price_key=price_key)
    assert report.estimated_cost_usd == pytest.approx(report.estimated_billed_tokens * 2.0 / 1e6)
    assert fake.requests == []


# ----------------------------------------------------------------------------------------------- prediction
def test_predict_on_tuned_endpoint_and_base_model(fake):
    provider = make_provider(fake)
    endpoint = f"projects/{PROJECT}/locations/us-central1/endpoints/42"
    prediction = provider.predict(endpoint, "Who won?", "The Broncos won.")
    assert prediction.text == "Denver Broncos"
    assert prediction.attempts == 1 and prediction.retry_wait_ms == 0
    assert prediction.input_tokens > 0 and prediction.output_tokens > 0
    model, body = fake.generate_requests[0]
    assert model == endpoint
    assert body["contents"] == [{"role": "user", "parts": [{"text": user_prompt("Who won?", "The Broncos won.")}]}]
    assert body["systemInstruction"]["parts"] == [{"text": SYSTEM_INSTRUCTION}]
    assert body["generationConfig"]["temperature"] == 0
    assert body["generationConfig"]["maxOutputTokens"] == 16

    provider.predict("gemini-2.5-flash", "Who won?", "The Broncos won.")
    assert fake.generate_requests[1][0] == f"projects/{PROJECT}/locations/us-central1/publishers/google/models/gemini-2.5-flash"


def test_predict_429_with_retry_after_then_success_latency_excludes_wait(fake):
    fake.fail("generate", 429, retry_after=2)
    sleeps = Sleeps(real=0.3)
    provider = make_provider(fake, sleeps)
    started = time.monotonic()
    prediction = provider.predict(f"projects/{PROJECT}/locations/us-central1/endpoints/42", "q", "c")
    total_ms = (time.monotonic() - started) * 1000
    assert prediction.text == "Denver Broncos"
    assert sleeps.calls == [2.0]  # the server's Retry-After, not our backoff
    assert prediction.attempts == 2 and prediction.retry_wait_ms == 2000.0
    assert prediction.latency_ms <= total_ms - 300  # the (real) wait is not in the latency
    assert len(fake.generate_requests) == 1


def test_500_then_success(fake, prepared):
    sleeps = Sleeps()
    provider = make_provider(fake, sleeps)
    fake.fail("upload", 503)
    fake.fail("create_job", 500)
    fake.fail("get_job", 500)
    fake.fail("tb_export", 503)
    job_id = provider.start_job(request_for(prepared)).job_id
    assert len(fake.created_jobs) == 1 and len(fake.objects) == 2
    job, points, _ = poll(provider, job_id)
    assert job.state == JobState.SUCCEEDED
    assert histories(points) == expected_histories(fake, job_id)
    assert sleeps.calls == [0.5] * 4  # initial backoff each time, no server hint
    predicted = provider.predict("gemini-2.5-flash", "q", "c")
    assert predicted.attempts == 1


def test_create_whose_response_is_lost_makes_one_job(fake, prepared):
    fake.fail("create_job", 503, after_effect=True)
    job = make_provider(fake).start_job(request_for(prepared))
    assert len(fake.created_jobs) == 1 and job.job_id == fake.job_names()[0]


def test_retry_budget_exhausted(fake):
    fake.fail("generate", 503, times=10, message="The service is currently unavailable.")
    sleeps = Sleeps()
    provider = make_provider(fake, sleeps)
    with pytest.raises(ProviderError) as info:
        provider.predict("gemini-2.5-flash", "q", "c")
    error = info.value
    assert error.status == 503 and error.retryable and error.provider == "vertex"
    assert "after 4 attempts" in str(error) and "currently unavailable" in str(error)
    assert len(sleeps.calls) == 3 and sleeps.calls == [0.5, 1.0, 2.0]
    assert TOKEN not in str(error) and TOKEN not in repr(error.__cause__)


def test_client_error_is_not_retried(fake):
    fake.fail("get_job", 404, message="TuningJob not found.")
    sleeps = Sleeps()
    with pytest.raises(ProviderError) as info:
        make_provider(fake, sleeps).get_job(f"projects/{PROJECT}/locations/us-central1/tuningJobs/999")
    assert info.value.status == 404 and not info.value.retryable
    assert sleeps.calls == []


def test_wrong_token_is_an_auth_error_without_the_token(fake, monkeypatch):
    monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", "ya29.some-other-token")
    with pytest.raises(ProviderError) as info:
        make_provider(fake).predict("gemini-2.5-flash", "q", "c")
    assert info.value.status == 401
    assert "ya29" not in str(info.value)


def test_slow_response_is_latency_not_wait(fake):
    fake.slow("generate", 0.2)
    prediction = make_provider(fake).predict("gemini-2.5-flash", "q", "c")
    assert prediction.latency_ms >= 200 and prediction.retry_wait_ms == 0


def test_project_and_location_from_env(fake, prepared, monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "env-project")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "europe-west4")
    provider = make_provider(fake, vertex={"project": "", "location": ""})
    assert (provider.project, provider.location) == ("env-project", "europe-west4")
    job = provider.start_job(request_for(prepared))
    assert job.job_id.startswith("projects/env-project/locations/europe-west4/tuningJobs/")


def test_fake_accepts_resumable_uploads_from_the_real_storage_client(fake):
    """The provider's files are small (multipart); the fake also speaks the resumable protocol for big ones."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    fake.expected_token = None
    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": fake.url})
    data = bytes(range(256)) * 2500  # 640,000 bytes: three 256 KiB chunks
    blob = client.bucket(BUCKET).blob("big/data.bin", chunk_size=256 * 1024)
    blob.upload_from_file(io.BytesIO(data), retry=None)  # size unknown: the client goes resumable
    assert fake.objects[(BUCKET, "big/data.bin")] == data
    assert fake.uploads == [(BUCKET, "big/data.bin", "resumable")]

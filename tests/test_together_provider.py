"""The Together provider: its pure parts by table (curves cursor, limits, data, job states), then the real
`together` SDK against the loopback fake: 429 with and without Retry-After, 5xx, resets, a lost create response,
the cost and model-limit refusals before anything is uploaded or created, a failed job's reason, cancel."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune_mlflow.config import load_config
from finetune_mlflow.errors import ConfigError, DataError, ProviderError
from finetune_mlflow.preparation import write_splits
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, TuningRequest
from finetune_mlflow.providers.retry import RetryPolicy
from finetune_mlflow.providers.together import curves, data, jobs, limits
from tests.fakes.loopback import RESET
from tests.fakes.together_server import FakeTogether, JobScript, model_limits

KEY = "tgp-test-0123456789abcdefghijklmnop"
BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"


# ------------------------------------------------------------------------------------------------ pure parts


def rows(*pairs):
    out = []
    for kind, step, value in pairs:
        out.append({f"{kind}/loss": value, f"{kind}/global_step": float(step)})
    return out


@pytest.mark.parametrize("cursor, served, expected, next_cursor", [
    (None, rows(("train", 1, 2.0), ("train", 2, 1.0)), [("train_loss", 1), ("train_loss", 2)], "2:train_loss"),
    # The step's eval row lands after its train row was read: read then, not lost, train not repeated.
    ("2:train_loss", rows(("train", 2, 1.0), ("eval", 2, 1.5)), [("val_loss", 2)], "2:train_loss,val_loss"),
    ("2:train_loss,val_loss", rows(("train", 2, 1.0), ("eval", 2, 1.5)), [], "2:train_loss,val_loss"),
    ("3:train_loss", rows(("train", 1, 9.0), ("train", 4, 0.5)), [("train_loss", 4)], "4:train_loss"),
    # A row served twice in one answer counts once; rows without a step or a finite value give nothing.
    (None, rows(("train", 5, 1.0), ("train", 5, 1.0)) + [{"train/loss": 1.0}, {"train/loss": float("nan"),
     "train/global_step": 6.0}], [("train_loss", 5)], "5:train_loss"),
    ("garbage", rows(("train", 1, 1.0)), [("train_loss", 1)], "1:train_loss"),
])
def test_metric_rows_are_read_once_by_step(cursor, served, expected, next_cursor):
    points, cursor_out = curves.new_points(served, cursor, 1_000)
    assert [(p.key, p.step) for p in points] == expected
    assert cursor_out == next_cursor


def fake_limits(**overrides):
    raw = model_limits(BASE)
    lora = SimpleNamespace(**raw.pop("lora_training"))
    return SimpleNamespace(**{**raw, "api_model_name": BASE, "lora_training": lora, **overrides})


def request(**overrides) -> TuningRequest:
    base = dict(run_id="0123456789abcdef0123456789abcdef", base_model=BASE, prepared_dir=Path("."), epochs=2,
                learning_rate=1e-4, batch_size=0, seed=0, suffix="squad")
    return TuningRequest(**{**base, **overrides})


@pytest.mark.parametrize("change, settings_change, named", [
    ({"epochs": 50}, {}, "tune.epochs"),
    ({"learning_rate": 5.0}, {}, "tune.learning_rate"),
    ({"batch_size": 4}, {}, "tune.batch_size"),
    ({}, {"lora_r": 128}, "together.lora_r"),
    ({}, {"n_checkpoints": 11}, "together.n_checkpoints"),
    ({}, {"lora_trainable_modules": "q_proj,lm_head"}, "together.lora_trainable_modules"),
    ({}, {"max_seq_length": 100}, "together.max_seq_length"),
])
def test_settings_the_model_refuses_are_named(change, settings_change, named):
    settings = load_config(None, {f"together.{k}": v for k, v in settings_change.items()}).together
    errors = limits.limit_errors(fake_limits(), request(**change), settings, 50, has_validation=True)
    assert len(errors) == 1 and errors[0].startswith(named)
    assert limits.limit_errors(fake_limits(), request(), load_config(None).together, 500, True) == []


def test_an_example_longer_than_the_sequence_length_is_refused():
    errors = limits.limit_errors(fake_limits(), request(), load_config(None).together, 9000, True)
    assert errors and "longest example" in errors[0]


@pytest.mark.parametrize("suffix, run_id", [("squad", "a" * 32), ("x" * 60, "b" * 32), ("bad/chars here", "c" * 32),
                                            ("", "d" * 32)])
def test_the_suffix_carries_the_run_within_togethers_40_characters(suffix, run_id):
    made = limits.run_suffix(suffix, run_id)
    assert len(made) <= limits.MAX_SUFFIX and made.endswith(run_id[:limits.RUN_TOKEN_LENGTH])
    assert all(c.isalnum() or c in "-_" for c in made)


@pytest.mark.parametrize("line, reason", [
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "assistant"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', "role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "content"),
    ('{"messages": [{"role": "assistant", "content": "a"}], "extra": 1}', "unrecognized key"),
    ('[1]', "JSON object"),
    ('{"messages": [', "not valid JSON"),
    ('', "blank line"),
])
def test_a_bad_record_names_its_file_and_line(tmp_path, line, reason):
    good = json.dumps(data.to_together_chat({"question": "q", "context": "c", "answers": ["a"]}))
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError, match=reason) as caught:
        data.load_records(path)
    assert ":2:" in str(caught.value) or "line 2" in str(caught.value)


@pytest.mark.parametrize("status, state", [("pending", JobState.PENDING), ("queued", JobState.PENDING),
                                           ("running", JobState.RUNNING), ("compressing", JobState.RUNNING),
                                           ("uploading", JobState.RUNNING), ("cancel_requested", JobState.RUNNING),
                                           ("completed", JobState.SUCCEEDED), ("error", JobState.FAILED),
                                           ("user_error", JobState.FAILED), ("cancelled", JobState.CANCELLED)])
def test_every_sdk_status_has_a_state(status, state):
    assert jobs.STATE_MAP[status] is state


def test_the_newest_error_event_is_the_failure_reason():
    event = lambda t, m, at, level="info": SimpleNamespace(type=t, message=m, created_at=at, level=level)  # noqa: E731
    code, message = jobs.failure_reason([event("job_error", "old", "2026-01-01T00:00:01Z"),
                                         event("job_start", "x", "2026-01-01T00:00:02Z"),
                                         event("job_error", "new", "2026-01-01T00:00:03Z")])
    assert (code, message) == ("job_error", "new")
    assert jobs.failure_reason([event("job_start", "x", "t")]) == (None, None)


# ------------------------------------------------------------------------------------------------ real SDK


@pytest.fixture(scope="module")
def prepared(small_squad, tmp_path_factory) -> Path:
    """Prepared once for the module: the tests only read it."""
    train, validation = small_squad
    config = load_config(None, {"train_data": str(train), "validation_data": str(validation), "max_examples": "30",
                                "data.max_validation_examples": "8"})
    folder = tmp_path_factory.mktemp("together") / "prepared"
    write_splits(config, folder)
    return folder


@pytest.fixture
def server(monkeypatch):
    with FakeTogether() as fake:
        monkeypatch.setenv("TOGETHER_API_KEY", KEY)
        monkeypatch.delenv("TOGETHER_BASE_URL", raising=False)
        yield fake
        assert fake.handler_errors == []


def provider_for(server, sleeps=None, **overrides):
    config = load_config(None, {"provider": "together", "together.base_url": server.base_url, "base_model": BASE,
                                "learning_rate": "0.0001", **overrides})
    waits = sleeps if sleeps is not None else []
    return get_provider("together", config) if sleeps is None else type(get_provider("together", config))(
        config, sleep=waits.append, retry_policy=RetryPolicy(max_attempts=4, initial_backoff_s=0.25))


def run_to_end(provider, job_id):
    points, cursor = [], None
    for _ in range(200):
        job = provider.get_job(job_id)
        page = provider.read_metrics(job_id, cursor)
        points, cursor = points + page.points, page.next_cursor
        if job.state in TERMINAL_STATES:
            return job, points
    raise AssertionError("the job never ended")


def test_a_job_streams_each_loss_once_and_reports_cost_and_checkpoints(server, prepared):
    provider = provider_for(server)
    server.script_next_job(JobScript(statuses=["pending", "queued"] + ["running"] * 6 + ["completed"], n_steps=12,
                                     eval_every=3))
    job = provider.start_job(request(prepared_dir=prepared))
    final, points = run_to_end(provider, job.job_id)
    served = server.served_points(job.job_id)
    for key in ("train_loss", "val_loss"):
        assert [(p.step, p.value) for p in points if p.key == key] == served[key]
    assert final.tuned_model == server.jobs[job.job_id].obj["model_output_name"]
    assert final.metrics["billed_training_tokens"] == 23_456 * 2
    assert final.metrics["provider_total_price_usd"] == pytest.approx(1.25)
    assert final.metrics["service_estimated_cost_usd"] == pytest.approx(3.5)
    body = server.created_jobs[0]
    assert body["training_type"]["type"] == "Lora" and body["suffix"].startswith("squad-")
    assert body["validation_file"] and body["n_evals"] == 4
    steps = [c.step for c in provider.checkpoints(job.job_id)]
    assert steps and max(steps) < 12  # the final checkpoint is the tuned model itself, not a candidate
    assert job.job_id in list(provider.list_jobs())


@pytest.mark.parametrize("retry_after, expected_wait", [("2", 2.0), (None, 0.25)])
def test_429_is_retried_honouring_retry_after(server, retry_after, expected_wait):
    sleeps: list[float] = []
    provider = provider_for(server, sleeps)
    server.inject(r"/v1/chat/completions", status=429, retry_after=retry_after)
    prediction = provider.predict(BASE, "Who?", "Someone did it.")
    assert sleeps == [expected_wait] and prediction.attempts == 2
    assert prediction.retry_wait_ms == pytest.approx(expected_wait * 1000)


@pytest.mark.parametrize("status", [500, 503, RESET])
def test_5xx_and_resets_are_retried(server, status):
    sleeps: list[float] = []
    provider = provider_for(server, sleeps)
    server.inject(r"/v1/fine-tunes$", method="GET", status=status, times=2)
    assert list(provider.list_jobs()) == []
    assert len(sleeps) == 2


def test_a_400_is_not_retried_and_names_the_call(server):
    sleeps: list[float] = []
    provider = provider_for(server, sleeps)
    server.inject(r"/v1/chat/completions", status=400, times=None)
    with pytest.raises(ProviderError, match=r"chat\.completions\.create.*HTTP 400") as caught:
        provider.predict(BASE, "q", "c")
    assert sleeps == [] and caught.value.status == 400 and caught.value.request_id


def test_a_lost_create_response_adopts_the_job_instead_of_paying_twice(server, prepared):
    provider = provider_for(server, [])
    server.inject(r"/v1/fine-tunes$", method="POST", status=500, after_handling=True)
    job = provider.start_job(request(prepared_dir=prepared))
    assert len(server.created_jobs) == 1 and job.job_id in server.jobs
    again = provider.start_job(request(prepared_dir=prepared))  # a rerun of the same MLflow run
    assert again.job_id == job.job_id and len(server.created_jobs) == 1


def test_the_service_estimate_above_max_cost_refuses_before_the_job(server, prepared):
    provider = provider_for(server, max_cost_usd="2")
    server.estimated_price = 7.5
    with pytest.raises(ConfigError, match=r"\$7\.50.*max_cost_usd=\$2.*no job was created"):
        provider.start_job(request(prepared_dir=prepared))
    assert server.created_jobs == []
    server.estimated_price, server.allowed_to_proceed = 1.0, False
    with pytest.raises(ConfigError, match="credit limit"):
        provider.start_job(request(prepared_dir=prepared))
    assert server.created_jobs == []


def test_the_dated_price_table_refuses_before_any_upload(server, prepared):
    import mlflow
    from mlflow.tracking import MlflowClient

    from finetune_mlflow.job_tracking import launch

    provider = provider_for(server, max_cost_usd="0.001", **{
        "together.training_price_per_million_tokens": {"Meta-Llama-3.1-8B-Instruct-Reference": 0.5}})
    with mlflow.start_run() as run:
        tuning = request(prepared_dir=prepared, run_id=run.info.run_id)
        report = provider.preflight(tuning)
        # Billed = epochs x training tokens + n_evals x validation tokens (Together's pricing rule).
        assert report.estimated_billed_tokens > 2 * report.estimated_train_tokens
        with pytest.raises(ConfigError, match="exceeds max_cost_usd"):
            launch(provider, tuning, provider.config, MlflowClient())
    assert not [r for r in server.requests if r[1].startswith("/v1/files")] and server.created_jobs == []


def test_model_limits_refuse_before_any_upload(server, prepared):
    provider = provider_for(server, **{"together.lora_r": "128"})
    with pytest.raises(ConfigError, match=r"together\.lora_r=128.*nothing was uploaded"):
        provider.preflight(request(prepared_dir=prepared))
    assert [r[1] for r in server.requests] == ["/v1/fine-tunes/models/limits"]


def test_a_failed_job_carries_its_error_event(server, prepared):
    provider = provider_for(server)
    server.script_next_job(JobScript(statuses=["pending", "running", "error"],
                                     error_message="Row 7 has no assistant turn"))
    job = provider.start_job(request(prepared_dir=prepared))
    final, _ = run_to_end(provider, job.job_id)
    assert final.state is JobState.FAILED
    assert (final.error_code, final.error_message) == ("job_error", "Row 7 has no assistant turn")


def test_the_cancel_entry_point_stops_a_running_job(server, prepared):
    from finetune_mlflow.steps.cancel import run_cancel

    provider = provider_for(server)
    server.script_next_job(JobScript(statuses=["pending"] + ["running"] * 20 + ["completed"]))
    job = provider.start_job(request(prepared_dir=prepared))
    cancelled = run_cancel(provider.config, job_id=job.job_id)
    assert cancelled.state is JobState.CANCELLED and server.jobs[job.job_id].obj["status"] == "cancelled"


def test_bad_job_ids_are_refused_before_any_request(server):
    provider = provider_for(server)
    for bad in ("../etc", "ftjob-abc", "http://x", "ft-"):
        with pytest.raises(ConfigError):
            provider.check_job_id(bad)
    assert server.requests == []


def test_the_key_comes_from_the_environment_and_never_reaches_logs(server, prepared, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    provider = provider_for(server)
    server.inject(r"/v1/chat/completions", status=401, times=None)
    with pytest.raises(ProviderError, match="TOGETHER_API_KEY") as caught:
        provider.predict(BASE, "q", "c")
    assert KEY not in str(caught.value) and KEY not in caplog.text
    monkeypatch.delenv("TOGETHER_API_KEY")
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY is not set"):
        provider_for(server)


def test_a_run_is_priced_from_the_jobs_token_counts_and_the_dated_tables():
    """Real cost: the job's billed tokens at the training price; every evaluated model (base, tuned output name,
    checkpoint) at its base model's inference price, the way serverless LoRA bills."""
    from finetune_mlflow.run_cost import TokenUsage, run_cost

    short = BASE.rsplit("/", 1)[-1]
    config = load_config(None, {"provider": "together", "base_model": BASE, "learning_rate": "0.0001",
                                "together.training_price_per_million_tokens": {short: 0.5},
                                "together.inference_price_per_million_tokens": {short: {"input": 0.2,
                                                                                        "output": 0.4}}})
    tuned = f"fake-account/{BASE}-squad-1a2b3c4d"
    usages = [TokenUsage(tuned, 1_000_000, 500_000), TokenUsage(f"{tuned}-step-7", 1_000_000, 0)]
    cost = run_cost("together", {"billed_training_tokens": 2_000_000}, config, usages,
                    {"estimated_cost_usd": 0.8})
    assert cost["cost_train_usd"] == pytest.approx(1.0)
    assert cost["cost_eval_usd"] == pytest.approx(0.2 + 0.2 + 0.2)
    assert cost["cost_estimate_ratio"] == pytest.approx(1.25)


def test_lifecycle_is_the_catalogs_status_found_across_pages(server):
    from tests.fakes.together_server import catalog_entry

    server.catalog = [catalog_entry(f"{BASE}-Other"), catalog_entry("meta-llama/Llama-3-8B"),
                      catalog_entry(BASE, "SUPPORTED_MODEL_STATUS_DEPRECATED", ("PRODUCT_SERVERLESS",))]
    provider = provider_for(server)
    facts = provider.lifecycle(BASE)
    assert (facts.stage, facts.accepts_new_jobs, facts.shutdown_date) == ("deprecated", False, None)
    assert facts.source.startswith("together:") and facts.checked_at.tzinfo is not None
    pages = [r for r in server.requests if r[1] == "/v2/supported-models"]
    assert len(pages) == 2  # the search matched the first two entries: the match is on the second page
    assert provider.lifecycle("Qwen/Not-Listed") is None

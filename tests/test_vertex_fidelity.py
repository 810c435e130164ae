"""What real Vertex AI does that the fake once did not (issue 22): thinking tokens and MAX_TOKENS, quota errors
without Retry-After, supervised progress, adapter-size names, tunable models and multi-region endpoints. Real
google-genai / google-auth clients against the loopback fake."""

from __future__ import annotations

import dataclasses

import pytest

from finetune_mlflow.errors import ConfigError, ProviderError
from finetune_mlflow.evaluation import run_predictions
from finetune_mlflow.providers.vertex.provider import VertexProvider, check_tunable
from tests.test_vertex_provider import (  # noqa: F401 - fixtures and helpers
    PROJECT,
    Sleeps,
    fake,
    make_config,
    poll,
    prepared,
    request_for,
    token_env,
)

ENDPOINT = f"projects/{PROJECT}/locations/us-central1/endpoints/42"


def provider_for(fake, *, base_model="gemini-2.5-flash", max_output_tokens=1024, sleeps=None, retry_policy=None,
                 **vertex) -> VertexProvider:
    config = make_config(fake, vertex=vertex)
    config = dataclasses.replace(config, tune=dataclasses.replace(config.tune, base_model=base_model),
                                 evaluate=dataclasses.replace(config.evaluate, max_output_tokens=max_output_tokens))
    return VertexProvider(config, sleep=sleeps or Sleeps(), retry_policy=retry_policy)


def sent_budget(fake) -> int | None:
    thinking = fake.generate_requests[-1][1]["generationConfig"].get("thinkingConfig") or {}
    return thinking.get("thinking_budget", thinking.get("thinkingBudget"))


# ----------------------------------------------------------------------------------------------- 1. thinking
def test_thinking_is_turned_off_for_tuned_flash_endpoints(fake):
    fake.thinking_tokens = 700
    prediction = provider_for(fake, max_output_tokens=16).predict(ENDPOINT, "Who won?", "The Broncos won.")
    assert sent_budget(fake) == 0
    assert prediction.text == "Denver Broncos" and prediction.output_tokens == len("Denver Broncos") // 4


def test_pro_cannot_turn_thinking_off_and_gets_its_lowest_budget(fake):
    fake.thinking_tokens = 700
    prediction = provider_for(fake, base_model="gemini-2.5-pro").predict(ENDPOINT, "Who won?", "The Broncos won.")
    assert sent_budget(fake) == 128
    # Thinking tokens bill as output: they are counted with the answer's.
    assert prediction.output_tokens == 128 + len("Denver Broncos") // 4


def test_thinking_tokens_are_counted_when_the_model_decides(fake):
    fake.thinking_tokens = 700
    prediction = provider_for(fake, thinking_budget=-1).predict("gemini-2.5-flash", "Who won?", "The Broncos won.")
    assert sent_budget(fake) == -1
    assert prediction.output_tokens == 700 + len("Denver Broncos") // 4


def test_an_answer_cut_empty_by_max_tokens_is_an_error_not_a_wrong_answer(fake):
    fake.thinking_tokens = 700
    provider = provider_for(fake, thinking_budget=-1, max_output_tokens=32)
    with pytest.raises(ProviderError, match="MAX_TOKENS before any answer"):
        provider.predict(ENDPOINT, "Who won?", "The Broncos won.")
    examples = [{"id": "q1", "question": "Who won?", "context": "The Broncos won.", "answers": ["Denver Broncos"]}]
    [row] = run_predictions(lambda q, c: provider.predict(ENDPOINT, q, c), examples, 1).results
    assert row.error is not None and "MAX_TOKENS" in row.error


# ----------------------------------------------------------------------------------------------- 5. quota back-off
def test_quota_429_without_retry_after_backs_off_in_seconds_with_jitter(fake):
    fake.fail("generate", 429, times=3, message="Resource exhausted. Please try again later.")
    sleeps = Sleeps()
    prediction = provider_for(fake, sleeps=sleeps).predict("gemini-2.5-flash", "q", "c")
    assert prediction.attempts == 4
    first, second, third = sleeps.calls
    assert 1.0 <= first <= 1.5 and 2.0 <= second <= 3.0 and 4.0 <= third <= 6.0  # 1 s doubling, up to +50%
    assert prediction.retry_wait_ms == pytest.approx(sum(sleeps.calls) * 1000)


def test_retry_info_delay_is_honoured(fake):
    fake.fail("generate", 429, retry_info="7s")
    sleeps = Sleeps()
    provider = provider_for(fake, sleeps=sleeps)
    provider.predict("gemini-2.5-flash", "q", "c")
    assert sleeps.calls == [7.0]


def test_quota_backoff_is_capped(fake):
    fake.fail("generate", 429, times=2)
    sleeps = Sleeps()
    provider_for(fake, sleeps=sleeps, quota_backoff_seconds=300).predict("gemini-2.5-flash", "q", "c")
    assert sleeps.calls == [32.0, 32.0]


# ----------------------------------------------------------------------------------------------- 6, 7. jobs
def test_supervised_progress_and_adapter_size_as_tune_logs_them(fake, prepared):
    provider = provider_for(fake)
    job_id = provider.start_job(request_for(prepared)).job_id
    job, points, _ = poll(provider, job_id)
    assert job.total_steps == max(p.step for p in points if p.key == "train_loss")
    assert "completed_step_count" not in job.metrics
    assert job.hyperparameters["adapter_size"] == "4"  # as tune logs it, not ADAPTER_SIZE_FOUR
    assert VertexProvider.max_parallel_jobs == 1  # the concurrent tuning-job quota guarantees one


# ----------------------------------------------------------------------------------------------- 8. models
def test_an_untunable_base_model_is_refused_before_any_request(fake, prepared):
    provider = provider_for(fake)
    for model in ("gemini-2.0-flash-001", "gemini-2.0-flash-lite-001", "gemini-x"):
        with pytest.raises(ConfigError, match="does not tune; supervised tuning supports gemini-2.5-flash, "
                                              "gemini-2.5-flash-lite, gemini-2.5-pro"):
            provider.preflight(request_for(prepared, base_model=model))
        with pytest.raises(ConfigError, match="does not tune"):
            provider.start_job(request_for(prepared, base_model=model))
    assert fake.requests == []


def test_multi_region_models_need_the_multi_region_endpoint():
    table = {"gemini-9-flash": "multi-region", "gemini-2.5-flash": "regional"}
    check_tunable("gemini-9-flash", "us", table)
    check_tunable("gemini-9-flash", "eu", table)
    check_tunable("gemini-2.5-flash", "europe-west4", table)
    with pytest.raises(ConfigError, match="served only from the us / eu multi-region endpoints.*us-central1"):
        check_tunable("gemini-9-flash", "us-central1", table)


@pytest.mark.parametrize("location, endpoint", [
    ("us", "https://aiplatform.us.rep.googleapis.com"),
    ("eu", "https://aiplatform.eu.rep.googleapis.com"),
    ("us-central1", "https://us-central1-aiplatform.googleapis.com"),
])
def test_default_endpoint_per_location(fake, location, endpoint):
    assert provider_for(fake, location=location, api_endpoint="").api_endpoint == endpoint


# ----------------------------------------------------------------------------------------------- 4. version floors
def test_sdk_floors_cover_what_the_code_calls_and_ci_installs_them():
    """openai.omit is in openai from 1.109; google-genai has CreateTuningJobConfig(labels=) from 1.36 (tunings.cancel
    1.32, HttpRetryOptions 1.21). `.ci/run` installs exactly these floors and runs the provider tests on them."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "pyproject.toml").read_text()

    def floor(name: str) -> tuple[int, ...]:
        found = re.search(rf'"{re.escape(name)}>=([0-9.]+)', text)
        assert found, name
        return tuple(int(x) for x in found.group(1).split("."))

    assert floor("openai") >= (1, 109) and floor("google-genai") >= (1, 36)
    ci = (root / ".ci" / "run").read_text()
    assert "FLOOR_PACKAGES=(openai google-genai google-cloud-storage)" in ci
    for test_file in re.search(r"FLOOR_TESTS=\(([^)]*)\)", ci).group(1).split():
        assert (root / test_file).is_file(), test_file


@pytest.mark.parametrize("name", ["squad_gemini_flash.yaml", "squad_gemini_pro.yaml"])
def test_shipped_gemini_experiments_name_tunable_models_priced_exactly(name):
    from pathlib import Path

    from finetune_mlflow.config import load_config
    from finetune_mlflow.providers.vertex.provider import TUNABLE_MODELS

    config = load_config(Path(__file__).resolve().parent.parent / "experiments" / name)
    check_tunable(config.tune.base_model, config.vertex.location)
    vertex = config.vertex
    assert config.tune.base_model in vertex.training_price_per_million_tokens
    assert config.tune.base_model in vertex.inference_price_per_million_tokens
    # No dated entry for a model Vertex no longer tunes (2.0 Flash / Flash-Lite).
    assert set(vertex.training_price_per_million_tokens) <= set(TUNABLE_MODELS)


def test_a_job_without_tensorboard_curves_names_its_gcs_metrics_uri(fake, prepared):
    uri = "gs://tuning-metrics/job-1/metrics"
    from tests.fakes.vertex_server import JobScript

    fake.script_next_job(JobScript(experiment_from_poll=10_000, gcs_metrics_uri=uri))
    provider = provider_for(fake)
    job_id = provider.start_job(request_for(prepared)).job_id
    job, points, _ = poll(provider, job_id)
    assert points == []
    from google.genai import types

    if "gcs_metrics_uri" not in types.TuningJob.model_fields:  # an SDK at its floor predates the field: no tag
        assert "vertex.gcs_metrics_uri" not in job.tags
        return
    assert job.tags["vertex.gcs_metrics_uri"] == uri
    assert f"{uri} (gcsMetricsUri, not read)" in provider.curve_sources(job_id)


def test_evaluating_a_model_without_its_own_inference_price_is_refused_by_name():
    from pathlib import Path

    from finetune_mlflow.config import load_config
    from finetune_mlflow.run_cost import check_eval_cost

    config = load_config(Path(__file__).resolve().parent.parent / "experiments" / "squad_gemini_flash.yaml")
    examples = [{"question": "Who won?", "context": "The Broncos won.", "answers": ["Broncos"]}]
    assert check_eval_cost(examples, ["gemini-2.5-flash-lite"], config, "vertex") > 0  # its own dated entry
    with pytest.raises(ConfigError, match="no price for gemini-2.5-flash-001 under "
                                          "vertex.inference_price_per_million_tokens"):
        check_eval_cost(examples, ["gemini-2.5-flash-001"], config, "vertex")  # not priced as gemini-2.5-flash

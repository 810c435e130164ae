"""Every checkpoint is a candidate, and every run says what it really cost: in-process `tune` runs against the
OpenAI and Vertex fakes (real SDK clients), where the answerer gives each checkpoint a known quality; then the
pure choices (which checkpoints, which winner, what cost) and the local provider's checkpoint list."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from finetune_mlflow import checkpoints as ckpt
from finetune_mlflow.config import load_config
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.preparation import ensure_prepared
from finetune_mlflow.evaluation import ExampleResult
from finetune_mlflow.providers.base import Checkpoint, Prediction
from finetune_mlflow.providers.local.provider import LocalProvider
from finetune_mlflow.run_cost import TokenUsage, cost_metrics, estimate_eval_cost
from finetune_mlflow.steps.tune import run_tune
from tests import e2e_support as e2e
from tests.fakes.openai_server import JobScript
from tests.fakes.vertex_server import FakeVertexServer
from tests.fakes.vertex_server import JobScript as VertexScript

OPENAI_MODEL = "squad-qa-openai-ckpt"
PRICES = {"ft:gpt-4o-mini-2024-07-18": (0.30, 1.20)}  # as experiments/squad_openai.yaml prices them


def openai_config(small_squad, **extra):
    train, validation = small_squad
    return load_config(e2e.ROOT / "experiments" / "squad_openai.yaml", {
        "train_data": str(train), "validation_data": str(validation), "max_examples": "150", "epochs": "3",
        "poll_interval": "0.01", "registered_model_name": OPENAI_MODEL, **extra})


def table(run_id: str) -> list[dict]:
    document = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{ckpt.TABLE}"))
    return [dict(zip(document["columns"], row)) for row in document["data"]]


def expected_eval_cost(server, models: list[str]) -> float:
    """USD of the validation questions the fake answered for `models` (not the example MLflow validates a logged
    model with), from the usage it reported, at the YAML's prices."""
    price_in, price_out = PRICES["ft:gpt-4o-mini-2024-07-18"]
    total = 0.0
    for body, (model, prompt, completion) in zip(server.chat_requests, server.chat_usage, strict=True):
        question = e2e.PROMPT.match(body["messages"][-1]["content"])
        if model in models and question and question.group("question").strip() in server.answerer.golds:
            total += prompt * price_in + completion * price_out
    return total / 1e6


def test_openai_tune_evaluates_each_checkpoint_and_registers_the_better_one(openai_fake, small_squad):
    openai_fake.script_next_job(JobScript(statuses=["running", "running", "succeeded"], n_steps=30, valid_every=5))
    openai_fake.answerer.checkpoint_quality = {20: "better"}  # step 10 stays "midway"; step 30 is the final model
    result = run_tune(openai_config(small_squad))
    client = MlflowClient()
    run = client.get_run(result.run_id)
    final = result.job.tuned_model
    models = {step: f"{final}:ckpt-step-{step}" for step in (10, 20)}

    # Each checkpoint was asked every validation question, the final model's checkpoint (step 30) not twice.
    asked = {m for m, _ in openai_fake.answerer.asked}
    assert asked >= set(models.values()) | {final} and not any(m.endswith("ckpt-step-30") for m in asked)
    for step, model in models.items():
        em, f1, _ = e2e.expected_scores(openai_fake.answerer, lambda m, model=model: m == model)
        assert e2e.history(result.run_id, "checkpoint_eval_f1")[[10, 20].index(step)] == (step, pytest.approx(f1))
    assert [s for s, _ in e2e.history(result.run_id, "checkpoint_latency_ms_p95")] == [10, 20]

    # The better checkpoint is registered, named with its step and epoch.
    version = client.search_model_versions(f"name = '{OPENAI_MODEL}'")[0]
    assert version.tags["tuned_model"] == models[20]
    assert (version.tags["finetune.checkpoint_step"], version.tags["finetune.checkpoint_epoch"]) == ("20", "2")
    assert version.tags["finetune.checkpoint_id"].startswith("ftckpt_")
    _, better_f1, _ = e2e.expected_scores(openai_fake.answerer, lambda m: m == models[20])
    # Rounded as a person reads it on the version page.
    assert float(version.tags["eval_f1"]) == pytest.approx(better_f1, abs=0.005)
    assert len(version.tags["eval_f1"].partition(".")[2]) == 2
    assert better_f1 > run.data.metrics["eval_f1"]
    assert run.data.metrics["selected_eval_f1"] == pytest.approx(better_f1)
    assert run.data.tags["finetune.selected_model"] == models[20]
    rows = table(result.run_id)
    assert [(r["checkpoint_id"] == "final", r["step"], r["selected"]) for r in rows] == \
        [(True, None, False), (False, 10, False), (False, 20, True)]
    assert rows[2]["eval_f1_delta_ci_low"] > 0 and rows[1]["eval_f1_delta"] < 0

    # What it really cost beside what was estimated: training from trained_tokens, evaluation from usage.
    metrics = run.data.metrics
    assert metrics["cost_train_usd"] == pytest.approx(12_345 / 1e6 * 3.00)
    assert metrics["cost_eval_usd"] == pytest.approx(expected_eval_cost(openai_fake, [final, *models.values()]),
                                                     rel=1e-4)
    assert metrics["cost_total_usd"] == pytest.approx(metrics["cost_train_usd"] + metrics["cost_eval_usd"], rel=1e-4)
    assert metrics["cost_estimate_ratio"] == pytest.approx(metrics["cost_train_usd"] / metrics["estimated_cost_usd"],
                                                           rel=1e-4)


def test_a_checkpoint_better_only_by_chance_never_displaces_the_final_model(openai_fake, small_squad):
    openai_fake.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=30, valid_every=5))
    openai_fake.answerer.checkpoint_quality = {10: "noisy", 20: "noisy"}
    result = run_tune(openai_config(small_squad))
    rows = {r["step"]: r for r in table(result.run_id)}
    for step in (10, 20):  # a higher F1 than the final model, one question's worth: the interval includes 0
        assert rows[step]["eval_f1"] > rows[None]["eval_f1"] and rows[step]["eval_f1_delta_ci_low"] <= 0
    version = MlflowClient().search_model_versions(f"name = '{OPENAI_MODEL}'")[0]
    assert version.tags["tuned_model"] == result.job.tuned_model
    assert not any(key.startswith("finetune.checkpoint_") for key in version.tags)
    assert rows[None]["selected"] and not rows[10]["selected"] and not rows[20]["selected"]


def test_eval_cost_guard_refuses_before_any_request(openai_fake, small_squad):
    """Base evaluation fits the budget; the tuned model with its two checkpoints (3 models, each twice the base
    model's rate) does not: refused before the first request to any of them, nothing registered."""
    config = openai_config(small_squad)
    with mlflow.start_run():
        examples = ensure_prepared(config).split("validation")
    base_cost = estimate_eval_cost(examples, [config.tune.base_model], config, "openai")
    openai_fake.script_next_job(JobScript(statuses=["running", "succeeded"], n_steps=30))
    with pytest.raises(ConfigError, match=r"evaluating 3 model\(s\) .* exceeds evaluate.max_cost_usd"):
        run_tune(openai_config(small_squad, eval_max_cost_usd=str(round(base_cost * 2.5, 6))))
    assert {body["model"] for body in openai_fake.chat_requests} == {config.tune.base_model}
    assert MlflowClient().search_registered_models() == []


@pytest.fixture
def vertex_fake(monkeypatch, small_squad):
    with FakeVertexServer(project="ckpt-project") as server:
        server.expected_token = "ya29.ckpt"
        answerer = e2e.Answerer(e2e.gold_answers(small_squad[1]), checkpoint_step=server.checkpoint_step)
        server.answer = e2e.vertex_responder(answerer)
        server.answerer = answerer
        monkeypatch.setenv("FINETUNE_VERTEX_ACCESS_TOKEN", "ya29.ckpt")
        for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "FINETUNE_VERTEX_STAGING_BUCKET"):
            monkeypatch.delenv(name, raising=False)
        yield server


def test_vertex_tune_evaluates_each_checkpoint_and_registers_the_better_one(vertex_fake, small_squad, tmp_path):
    vertex_fake.script_next_job(VertexScript(states=["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"],
                                             points_per_poll=8))
    vertex_fake.answerer.checkpoint_quality = {3: "better"}  # 8 steps, 3 epochs: checkpoints at steps 3, 5, 8
    config = yaml.safe_load((e2e.ROOT / "experiments" / "squad_gemini_flash.yaml").read_text())
    config["vertex"].update(project="ckpt-project", staging_bucket="ckpt-bucket", api_endpoint=vertex_fake.url,
                            storage_endpoint=vertex_fake.url)
    path = tmp_path / "flash.yaml"
    path.write_text(yaml.safe_dump(config))
    train, validation = small_squad
    result = run_tune(load_config(path, {"train_data": str(train), "validation_data": str(validation),
                                         "max_examples": "150", "epochs": "3", "poll_interval": "0.01",
                                         "registered_model_name": "squad-qa-gemini-ckpt"}))
    rows = {r["step"]: r for r in table(result.run_id)}
    assert sorted(s for s in rows if s is not None) == [3, 5]  # step 8 is the tuned model's own endpoint
    assert [s for s, _ in e2e.history(result.run_id, "checkpoint_eval_f1")] == [3, 5]
    version = MlflowClient().search_model_versions("name = 'squad-qa-gemini-ckpt'")[0]
    assert version.tags["tuned_model"] == rows[3]["model"] != result.job.tuned_model
    assert (version.tags["finetune.checkpoint_id"], version.tags["finetune.checkpoint_step"],
            version.tags["finetune.checkpoint_epoch"]) == ("1", "3", "1")
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    # 150 examples x 100 tokens in the dataset (the fake's count), billed for each of 3 epochs at $5/1M.
    assert metrics["billed_training_tokens"] == 150 * 100 * 3
    assert metrics["cost_train_usd"] == pytest.approx(150 * 100 * 3 / 1e6 * 5.0)
    assert metrics["cost_eval_usd"] > 0 and metrics["cost_estimate_ratio"] > 0
    assert metrics["cost_total_usd"] == pytest.approx(metrics["cost_train_usd"] + metrics["cost_eval_usd"], rel=1e-4)


# ------------------------------------------------------------------------------------------------ pure choices

def checkpoint(step: int, **metrics) -> Checkpoint:
    return Checkpoint(f"c{step}", f"model-{step}", step, step // 10, metrics)


def test_select_follows_the_knob_and_never_repeats_the_final_model():
    five = [checkpoint(s) for s in (10, 20, 30, 40, 50)]
    curve = {5: 3.0, 20: 1.0, 45: 2.0}
    assert [c.step for c in ckpt.select(five[:4], "auto", "model-40", curve)] == [10, 20, 30]
    assert [c.step for c in ckpt.select(five, "auto", None, curve)] == [20, 50]  # best val_loss + last
    assert [c.step for c in ckpt.select(five, "last", "model-50", curve)] == []
    assert [c.step for c in ckpt.select(five, "best_val_loss", None, {})] == []
    # A checkpoint's own validation loss wins over the curve; the full-set one over the batch one.
    own = [checkpoint(10, val_loss=0.5), checkpoint(20, val_loss=0.1, full_valid_loss=0.9)]
    assert [c.step for c in ckpt.select(own, "best_val_loss", None, curve)] == [10]


def test_choose_needs_evidence():
    def candidate(step, f1, low, error=None):
        return ckpt.Candidate(checkpoint(step), {"eval_f1": f1, "eval_f1_delta_ci_low": low}, [], error)

    assert ckpt.choose([candidate(10, 80.0, 0.0), candidate(20, 75.0, -1.0)]) is None  # ties and noise
    assert ckpt.choose([candidate(10, 80.0, 0.5), candidate(20, 85.0, 2.0)]).checkpoint.step == 20
    assert ckpt.choose([candidate(10, 90.0, 5.0, error="40% of requests failed")]) is None


def test_a_checkpoint_that_is_the_final_model_is_scored_from_its_rows_without_a_request():
    class Provider:  # answers with the model id; the checkpoint at step 20 is the final model, byte for byte
        name, batched_prediction, max_concurrency, asked = "stub", False, 1, []

        def same_model(self, model, other):
            return {model, other} == {"model-20", "final"}

        def predict(self, model, question, context):
            self.asked.append(model)
            return Prediction(model, 1.0)

    rows = [ExampleResult(f"q{i}", "?", "final", ["final"], 1.0, 1.0, 1.0, None) for i in range(5)]
    examples = [{"id": r.id, "question": "?", "context": "c", "answers": ["final"]} for r in rows]
    provider = Provider()
    found = ckpt.evaluate(provider, [checkpoint(10), checkpoint(20)], examples, load_config(None), rows, "final")
    assert provider.asked == ["model-10"] * 5  # only the checkpoint that differs was asked
    same = found[1]
    assert same.rows == rows and same.metrics["eval_f1"] == 100.0
    assert (same.metrics["eval_f1_delta"], same.metrics["eval_f1_delta_ci_low"]) == (0.0, 0.0)
    assert ckpt.choose(found) is None


def test_cost_metrics_only_from_reported_numbers():
    usage = [TokenUsage("m", 1_000_000, 500_000)]
    assert cost_metrics(2_000_000, 3.0, usage, [(0.3, 1.2)], 5.0) == {
        "cost_train_usd": 6.0, "cost_eval_usd": 0.9, "cost_total_usd": 6.9, "cost_estimate_ratio": 1.2}
    assert cost_metrics(None, 3.0, usage, [None], 5.0) == {}  # nothing reported or priced: no number made up
    assert cost_metrics(1_000_000, 3.0, [None], [None], None) == {"cost_train_usd": 3.0}


def test_local_provider_reads_its_checkpoints_defensively(tmp_path):
    provider = LocalProvider(load_config(None, {"local.jobs_dir": str(tmp_path)}))
    job = tmp_path / "localjob-1"
    job.mkdir()
    assert provider.checkpoints("localjob-1") == []  # no status yet
    (job / "status.json").write_text(json.dumps({"state": "succeeded"}))
    assert provider.checkpoints("localjob-1") == []  # a trainer that keeps none
    (job / "status.json").write_text(json.dumps({"state": "succeeded", "checkpoints": [
        {"checkpoint_id": "epoch-2", "epoch": 2, "step": 20, "path": "/w/e2.npz", "val_loss": 0.4},
        {"checkpoint_id": "epoch-1", "epoch": 1, "step": 10, "path": "/w/e1.npz"},
        {"checkpoint_id": "broken", "epoch": 3}]}))
    found = provider.checkpoints("localjob-1")
    # Models are named inside the jobs home (`<job>/checkpoints/<file>`), whatever path the trainer wrote.
    assert [(c.checkpoint_id, c.step, c.epoch, c.model, c.metrics) for c in found] == [
        ("epoch-1", 10, 1, "localjob-1/checkpoints/e1.npz", {}),
        ("epoch-2", 20, 2, "localjob-1/checkpoints/e2.npz", {"val_loss": 0.4})]

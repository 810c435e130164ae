"""A registered version is evaluated from the files it ships, without a pyfunc load: the same answers as its pyfunc,
also once the jobs folder that trained it is gone (a teammate's machine); a version logged without `serving.json`
(an older release) still resolves through its pyfunc. An evaluation's sample of requests is one trace of the run
with a span per request, wrong answers first."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import load_config
from finetune_mlflow.evaluation import ExampleResult
from finetune_mlflow.model_code import PACKAGE_DIR
from finetune_mlflow.providers.local import span_model
from finetune_mlflow.providers.local.provider import save_weights
from finetune_mlflow.registry import register_tuned_model
from finetune_mlflow.scoring import resolve_model
from finetune_mlflow.traces import SPAN_NAME_CHARS, record_traces, span_name
from tests.conftest import ROOT

JOB = "localjob-0123456789ab"
QUESTIONS = pd.DataFrame({
    "question": ["Who signed the treaty?", "When was the city founded?", "What does the river cross?"],
    "context": ["In 911 Rollo signed the treaty of Saint-Clair-sur-Epte with King Charles the Simple.",
                "The city was founded in 1257 by merchants from the north, who built its first walls.",
                "The river crosses three provinces before it reaches the sea near the old harbour."],
})


def jobs_home() -> Path:
    return Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs"


def config():
    return load_config(ROOT / "experiments" / "squad_local.yaml", {})


def register_local_version() -> str:
    """A local model with weights of its own (not the base heuristic), registered as `tune` does."""
    weights = span_model.initial_weights(8)
    rng = np.random.default_rng(0)
    tuned = span_model.Weights({k: v + rng.normal(0, 0.5, v.shape) for k, v in weights.blocks.items()})
    path = jobs_home() / JOB / "weights.npz"
    path.parent.mkdir(parents=True)
    save_weights(path, tuned, {"treaty": 2.5, "founded": 2.0, "river": 1.5}, 8)
    with mlflow.start_run(tags={"finetune.base_model": "span-ranker-base"}) as run:
        version = register_tuned_model(
            run_id=run.info.run_id, config=config(), provider="local", model_id=f"{JOB}/weights.npz",
            logged_model_id=None, artifacts={"weights": str(path)}, packages=("numpy",),
            tags={"provider": "local", "base_model": "span-ranker-base", "tuned_model": f"{JOB}/weights.npz"},
            description="test version")
    return version.model_uri


def answers_of(model_uri: str, monkeypatch) -> list[str]:
    """The answers `evaluate` gets for QUESTIONS, resolving the version with pyfunc loads forbidden."""
    with monkeypatch.context() as patched:
        patched.setattr(mlflow.pyfunc, "load_model", lambda *a, **k: pytest.fail("pyfunc load on the fast path"))
        resolved = resolve_model(model_uri, config())
    assert resolved.provider.name == "local" and resolved.base_model == "span-ranker-base"
    return [resolved.provider.predict(resolved.model_id, q, c).text for q, c in zip(QUESTIONS.question,
                                                                                    QUESTIONS.context)]


def test_a_version_evaluates_like_its_pyfunc_without_loading_it(monkeypatch):
    uri = register_local_version()
    served = mlflow.pyfunc.load_model(uri).predict(QUESTIONS)["answer"].tolist()
    assert answers_of(uri, monkeypatch) == served
    base = resolve_model("base", config())
    assert [base.provider.predict(base.model_id, q, c).text for q, c in zip(QUESTIONS.question, QUESTIONS.context)
            ] != served, "the test model must answer differently from the base heuristic"


def test_a_version_whose_jobs_folder_is_gone_downloads_what_it_ships(monkeypatch):
    uri = register_local_version()
    served = mlflow.pyfunc.load_model(uri).predict(QUESTIONS)["answer"].tolist()
    shutil.rmtree(jobs_home())
    MlflowClient().set_registered_model_alias("squad-qa-local", "champion", "1")
    assert answers_of("models:/squad-qa-local@champion", monkeypatch) == served
    run_id = MlflowClient().get_model_version("squad-qa-local", "1").run_id
    assert answers_of(f"runs:/{run_id}", monkeypatch) == served


def test_a_version_without_serving_json_resolves_through_its_pyfunc():
    """What an older release logged: the settings as the pyfunc's model_config, no `serving` artifact."""
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PACKAGE_DIR / "serving.py"),
                                       model_config={"provider": "local", "model_id": "span-ranker-base"},
                                       pip_requirements=["mlflow"], registered_model_name="old-format")
    resolved = resolve_model(f"models:/old-format/{info.registered_model_version}", config())
    assert resolved.provider.name == "local" and resolved.model_id == "span-ranker-base"
    assert resolved.provider.predict(resolved.model_id, QUESTIONS.question[0], QUESTIONS.context[0]).text


def result(i: int, f1: float, error: str | None = None) -> ExampleResult:
    return ExampleResult(f"q{i}", f"question {i}?", "" if error else f"answer {i}", [f"gold {i}"], float(f1 == 1.0),
                         f1, None if error else 1.5, error)


def test_the_sample_is_one_trace_of_the_run_with_a_span_per_request_wrong_answers_first():
    results = [result(i, 1.0) for i in range(8)] + [result(8, 0.5), result(9, 0.0, "Timeout: slow")]
    with mlflow.start_run() as run:
        written = record_traces(results, {r.id: f"context {r.id}" for r in results}, model="m1", provider="local",
                                experiment_id=run.info.experiment_id, run_id=run.info.run_id, size=4,
                                tags={"finetune.model_version": "squad-qa-local/3"})
    assert written == 4
    traces = MlflowClient().search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, flush=True)
    assert len(traces) == 1
    assert traces[0].info.tags["finetune.model_version"] == "squad-qa-local/3"
    root, *spans = traces[0].data.spans
    assert root.name == "evaluate m1" and root.inputs == {"model": "m1", "sampled_requests": 4, "of": 10}
    assert root.outputs == {"recorded": 4, "wrong": 2}
    # Spans are named by their question (the trace tree shows names), wrong answers first; the id is an attribute.
    assert {s.name for s in spans[:2]} == {"question 8?", "question 9?"}
    failed = next(s for s in spans if s.attributes["question_id"] == "q9")
    assert failed.status.status_code == "ERROR" and failed.outputs["error"] == "Timeout: slow"
    assert all(s.parent_id == root.span_id and "context q" in s.inputs["prompt"] for s in spans)


@pytest.mark.parametrize("question, name", [
    ("Who wrote it?", "Who wrote it?"),
    ("  Who\n wrote\tit? ", "Who wrote it?"),
    ("", "(empty question)"),
    ("word " * 40, ("word " * 16).strip() + "…"),
])
def test_a_span_is_named_by_its_question_on_one_readable_line(question, name):
    assert span_name(question) == name and len(span_name(question)) <= SPAN_NAME_CHARS

"""The sweep entry point: a grid from the YAML's sweep block, refused before anything runs when it cannot be run,
children under one parent, and a rerun of the parent that launches nothing new."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main as cli_main
from finetune_mlflow.config import load_config, with_overrides
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.sweep_plan import plan_sweep, point_key

ROOT = Path(__file__).resolve().parents[1]


def test_grid_points_cover_every_combination_under_dotted_keys():
    plan = plan_sweep({"grid": {"epochs": [1, 2], "learning_rate": [0.01, 0.1], "vertex.adapter_size": [4]},
                       "max_parallel_jobs": 2}, "s.yaml")
    assert len(plan.points) == 4 and plan.max_parallel_jobs == 2
    assert plan.points[0] == {"tune.epochs": 1, "tune.learning_rate": 0.01, "vertex.adapter_size": 4}
    assert point_key(plan.points[0]) == point_key(dict(reversed(list(plan.points[0].items()))))


@pytest.mark.parametrize(("block", "message"), [
    (None, "needs a sweep: block"),
    ({"grid": {}}, "needs a sweep: block"),
    ({"grid": {"epochs": []}}, r"sweep.grid.epochs must be a non-empty list"),
    ({"grid": {"epochs": 3}}, r"sweep.grid.epochs must be a non-empty list"),
    ({"grid": {"epochs": [1, 1]}}, "lists a value twice"),
    ({"grid": {"epoch": [1, 2]}}, "unknown key 'epoch'"),
    ({"grid": {"epochs": [1]}, "parallel": 2}, "sweep: unknown key 'parallel'"),
    ({"grid": {"epochs": list(range(1, 11)), "learning_rate": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}},
     "60 points, over sweep.max_grid_points=50"),
    ({"grid": {"epochs": [1]}, "max_cost_usd": -1}, r"sweep.max_cost_usd is -1"),
])
def test_a_grid_that_cannot_run_is_refused_naming_the_file_and_key(block, message):
    with pytest.raises(ConfigError, match=message) as caught:
        plan_sweep(block, "experiments/s.yaml")
    assert "experiments/s.yaml" in str(caught.value)


def test_every_point_is_validated_like_a_parameter():
    config = load_config(ROOT / "experiments" / "sweep_local.yaml")
    with pytest.raises(ConfigError, match=r"tune.learning_rate is inf; expected a finite number"):
        with_overrides(config, {"tune.learning_rate": float("inf")})
    assert with_overrides(config, {"tune.epochs": 2}).tune.epochs == 2


def write_sweep(tmp_path: Path, train: Path, validation: Path, extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""
data: {{train_data: {train}, validation_data: {validation}, max_examples: 200}}
tune: {{provider: local, batch_size: 32, poll_interval: 0.1}}
evaluate: {{max_concurrency: 1, bootstrap_samples: 200, trace_samples: 2}}
sweep:
  grid: {{epochs: [1, 2]}}
  max_parallel_jobs: 2
{extra}""", encoding="utf-8")
    return path


def test_a_sweep_runs_its_points_under_one_parent_and_a_rerun_launches_nothing(tmp_path, small_squad, capsys,
                                                                               monkeypatch):
    monkeypatch.chdir(ROOT)
    config = write_sweep(tmp_path, *small_squad)
    assert cli_main(["sweep", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("launching") == 2 and "winner: tune local/span-ranker-base e" in out
    client = MlflowClient()
    parent = client.search_runs(["0"], "tags.`finetune.step` = 'sweep'")[0]
    children = client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    tunes = [c for c in children if c.data.tags["finetune.step"] == "tune"]
    assert sorted(c.data.params["epochs"] for c in tunes) == ["1", "2"]
    assert {c.data.tags["finetune.step"] for c in children} == {"tune", "prepare", "evaluate"}  # prepare, base once
    assert parent.data.tags["finetune.winner_run_id"] in {c.info.run_id for c in tunes}
    assert parent.data.metrics["sweep_n_points"] == 2 and parent.data.metrics["sweep_n_failed"] == 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= artifacts
    jobs = sorted(os.listdir(Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs"))
    assert len(jobs) == 2

    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)  # what `mlflow run --run-id <parent>` does
    assert cli_main(["sweep", "--config", str(config)]) == 0
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # MLflow consumes it when it resumes the run
    assert capsys.readouterr().out.count("finished earlier, kept") == 2
    assert sorted(os.listdir(Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs")) == jobs  # no second job


def test_a_grid_over_its_budget_launches_nothing(tmp_path, small_squad, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    train, validation = small_squad
    path = tmp_path / "openai_sweep.yaml"
    path.write_text(f"""
data: {{train_data: {train}, validation_data: {validation}, max_examples: 100}}
tune: {{provider: openai, base_model: gpt-4o-mini-2024-07-18}}
openai: {{base_url: "http://127.0.0.1:9/v1", training_price_per_million_tokens: {{gpt-4o-mini-2024-07-18: 3.0}}}}
sweep:
  grid: {{epochs: [1, 2, 3]}}
  max_cost_usd: 0.0001
""", encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-sweep0123456789abcdef")
    assert cli_main(["sweep", "--config", str(path)]) == 2
    assert "exceeds max_cost_usd" in capsys.readouterr().err
    runs = MlflowClient().search_runs(["0"])
    assert not [r for r in runs if r.data.tags.get("finetune.step") == "tune"]  # nothing launched
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED"}


def test_a_grid_over_an_unpriced_model_launches_nothing(tmp_path, small_squad, capsys, monkeypatch):
    """A snapshot without its own price is not priced as its alias, nor counted as free: the guard refuses."""
    monkeypatch.chdir(ROOT)
    train, validation = small_squad
    path = tmp_path / "openai_sweep.yaml"
    path.write_text(f"""
data: {{train_data: {train}, validation_data: {validation}, max_examples: 100}}
tune: {{provider: openai, base_model: gpt-4o-mini-2099-01-01}}
openai: {{base_url: "http://127.0.0.1:9/v1", training_price_per_million_tokens: {{gpt-4o-mini: 3.0}}}}
sweep:
  grid: {{epochs: [1, 2]}}
  max_cost_usd: 100
""", encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-sweep0123456789abcdef")
    assert cli_main(["sweep", "--config", str(path)]) == 2
    assert "no price for gpt-4o-mini-2099-01-01" in capsys.readouterr().err
    runs = MlflowClient().search_runs(["0"])
    assert not [r for r in runs if r.data.tags.get("finetune.step") == "tune"]  # nothing launched


def test_a_sweep_against_the_openai_fake_runs_children_in_parallel_within_its_limit(tmp_path, small_squad,
                                                                                    openai_fake, monkeypatch):
    monkeypatch.chdir(ROOT)
    train, validation = small_squad
    path = tmp_path / "openai_sweep.yaml"
    path.write_text(f"""
data: {{train_data: {train}, validation_data: {validation}, max_examples: 150}}
tune: {{provider: openai, base_model: gpt-4o-mini-2024-07-18, poll_interval: 0.05,
        registered_model_name: squad-qa-openai-sweep}}
evaluate: {{checkpoints: last, trace_samples: 0, bootstrap_samples: 200}}
sweep:
  grid: {{epochs: [1, 2, 3]}}
  max_parallel_jobs: 2
""", encoding="utf-8")
    assert cli_main(["sweep", "--config", str(path)]) == 0
    client = MlflowClient()
    parent = client.search_runs(["0"], "tags.`finetune.step` = 'sweep'")[0]
    children = [r for r in client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
                if r.data.tags["finetune.step"] == "tune"]
    assert len(children) == 3 and len(openai_fake.created_jobs) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    # Three models logged, one registered: the winner.
    versions = client.search_model_versions("name = 'squad-qa-openai-sweep'")
    assert [v.run_id for v in versions] == [parent.data.tags["finetune.winner_run_id"]]
    # Children ran side by side, never more than max_parallel_jobs at once.
    edges = sorted([(c.info.start_time, 1) for c in children] + [(c.info.end_time, -1) for c in children])
    running, most = 0, 0
    for _, change in edges:
        running += change
        most = max(most, running)
    assert most == 2

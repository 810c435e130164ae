"""The local provider end to end, as a user runs it: MLproject entry points, registry, promotion, serving."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import load_config
from finetune_mlflow.pipeline import run_main
from finetune_mlflow.steps.promote import run_promote, run_rollback
from finetune_mlflow.steps.tune import run_tune
from tests.conftest import ROOT

EVAL_KEYS = {"eval_exact_match", "eval_f1", "eval_f1_ci_low", "eval_f1_ci_high", "eval_exact_match_ci_low",
             "eval_exact_match_ci_high", "eval_n", "eval_error_count", "eval_throughput_rps", "latency_ms_mean",
             "latency_ms_p50", "latency_ms_p90", "latency_ms_p95", "latency_ms_p99", "latency_ms_max"}


def small_config(small_squad, **overrides):
    """Test-sized data: ~120 validation questions give a tuned model a few F1 points over base with an interval
    about 7 points wide, so the gates here accept a lower bound down to -10 (a model below base is still never
    promoted); test_promote_race holds the gates at their defaults."""
    train, validation = small_squad
    return load_config(ROOT / "experiments" / "squad_local.yaml",
                       {"train_data": str(train), "validation_data": str(validation), "poll_interval": "0.05",
                        "evaluate.bootstrap_samples": "200", "promotion.min_f1_gain": "-10", **overrides})


def job_dirs() -> list[Path]:
    root = Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs"
    return sorted(root.iterdir()) if root.exists() else []


def test_tune_entry_point_through_mlflow_run(small_squad):
    train, validation = small_squad
    submitted = mlflow.projects.run(
        str(ROOT), entry_point="tune", env_manager="local", synchronous=True,
        parameters={"train_data": str(train), "validation_data": str(validation), "epochs": "2",
                    "poll_interval": "0.1"},
    )
    client = MlflowClient()
    run = client.get_run(submitted.run_id)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    # The knobs that define the run, each under one name, and only the active provider's section.
    assert {"provider", "base_model", "epochs", "learning_rate", "batch_size", "data_sha256", "config_file"} <= set(params)
    assert not [k for k in params if k.startswith(("openai.", "vertex.", "provider_settings"))]
    assert params["provider"] == "local" and params["epochs"] == "2"
    assert run.info.run_name.startswith("tune local/span-ranker-base e2 lr")
    assert tags["mlflow.note.content"].startswith("F1 ") and tags["finetune.job_id"] in tags["mlflow.note.content"]
    assert {"n_train", "n_val"} <= set(metrics) and "estimated_billed_tokens" not in metrics  # local bills nothing
    assert EVAL_KEYS <= set(metrics)
    assert {"base_eval_exact_match", "base_eval_f1", "eval_f1_delta", "eval_f1_delta_ci_low"} <= set(metrics)
    assert metrics["eval_f1"] > metrics["base_eval_f1"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    steps = [m.step for m in history]
    assert len(steps) >= 20 and len(steps) == len(set(steps)) and sorted(steps) == list(range(1, len(steps) + 1))
    assert client.get_metric_history(run.info.run_id, "val_loss")
    assert tags["finetune.job_id"].startswith("localjob-") and tags["finetune.job_state"] == "succeeded"
    assert tags["finetune.tuned_model"].endswith("weights.npz")
    table = mlflow.load_table("eval_results.json", run_ids=[run.info.run_id])
    assert {"id", "question", "prediction", "gold_answers", "em", "f1", "latency_ms", "error"} <= set(table.columns)
    assert len(table) == metrics["eval_n"]
    # Datasets are run inputs of the prepare run this tune run used.
    prepare = client.get_run(tags["finetune.prepare_run_id"])
    assert {d.dataset.name for d in prepare.inputs.dataset_inputs} == {"train", "validation"}
    versions = client.search_model_versions("name = 'squad-qa-local'")
    assert len(versions) == 1
    version = versions[0]
    assert version.run_id == run.info.run_id
    assert {"provider", "base_model", "job_id", "tuned_model", "source_run", "data_sha256"} <= set(version.tags)
    model = mlflow.pyfunc.load_model(f"models:/squad-qa-local/{version.version}")
    answer = model.predict(pd.DataFrame({"question": ["Who signed the treaty?"],
                                         "context": ["In 911 Rollo signed the treaty with King Charles."]}))
    assert list(answer.columns) == ["answer"] and answer["answer"][0]


def test_rerun_with_the_same_run_id_reattaches_instead_of_training_again(small_squad, monkeypatch):
    config = small_config(small_squad, epochs="1")
    first = run_tune(config)
    history = [m.step for m in MlflowClient().get_metric_history(first.run_id, "train_loss")]
    monkeypatch.setenv("MLFLOW_RUN_ID", first.run_id)  # what `mlflow run --run-id <id>` does
    second = run_tune(config)
    assert second.run_id == first.run_id and second.job.job_id == first.job.job_id
    assert len(job_dirs()) == 1
    again = [m.step for m in MlflowClient().get_metric_history(first.run_id, "train_loss")]
    assert again == history
    assert second.version == first.version
    assert len(MlflowClient().search_model_versions("name = 'squad-qa-local'")) == 1


def test_promotion_follows_the_evidence_and_rolls_back(small_squad):
    client = MlflowClient()
    alias = lambda name: str(client.get_model_version_by_alias("squad-qa-local", name).version)  # noqa: E731
    # A deliberately poor model (a few examples, a huge step) is worse than the base model: never promoted, even
    # with no champion to beat.
    weak = {"epochs": "1", "max_examples": "40", "learning_rate": "1.0"}
    first = run_main(small_config(small_squad, **weak))
    assert not first.decision.promote and "not above the base model" in first.decision.reason
    assert first.champion_after is None and alias("challenger") == "1"
    better = run_main(small_config(small_squad, epochs="2"))
    assert better.decision.promote and "beats the base model" in better.decision.reason
    assert alias("champion") == "2"
    # Another poor model (the same settings again would train the same model, registered once: version 1).
    worse = run_main(small_config(small_squad, **{**weak, "learning_rate": "0.9"}))
    assert not worse.decision.promote and worse.champion_after == "2"
    assert alias("challenger") == "3"
    assert client.get_model_version("squad-qa-local", "3").tags["promotion.decision"] == "rejected"
    with pytest.raises(Exception, match="needs a reason"):
        run_promote(small_config(small_squad), version="3", force=True)
    forced = run_promote(small_config(small_squad), version="3", force=True, reason="manual override in test")
    assert forced.decision.promote and alias("champion") == "3" and alias("previous_champion") == "2"
    rolled = run_rollback(small_config(small_squad), "")
    assert rolled.champion_after == "2" and alias("champion") == "2" and alias("previous_champion") == "3"
    # Every decision is a run with its evidence and report.
    experiment = mlflow.get_experiment_by_name("Default").experiment_id
    decisions = client.search_runs([experiment], "tags.`finetune.step` = 'promote'")
    assert len(decisions) == 5
    kept = next(r for r in decisions if r.data.tags.get("promotion.decision") == "keep")
    assert {"f1_delta", "f1_delta_ci_low", "f1_delta_ci_high"} <= set(kept.data.metrics)
    assert "promotion_report.md" in [a.path for a in client.list_artifacts(kept.info.run_id)]
    # main reused one prepare run per distinct data config (max_examples differs between the two).
    assert len(client.search_runs([experiment], "tags.`finetune.step` = 'prepare'")) == 2


def test_evaluate_entry_point_scores_base_and_champion(small_squad):
    train, validation = small_squad
    run_main(small_config(small_squad, epochs="1"))
    params = {"train_data": str(train), "validation_data": str(validation)}
    client = MlflowClient()
    for model in ("base", "models:/squad-qa-local@champion"):
        submitted = mlflow.projects.run(str(ROOT), entry_point="evaluate", env_manager="local", synchronous=True,
                                        parameters={**params, "model": model})
        run = client.get_run(submitted.run_id)
        assert run.info.status == "FINISHED"
        assert EVAL_KEYS <= set(run.data.metrics), model
    assert "eval_f1_delta_ci_high" in run.data.metrics  # the champion is compared with the base run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_champion_is_servable(small_squad):
    run_main(small_config(small_squad, epochs="1"))
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/squad-qa-local@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(), start_new_session=True,
    )
    try:
        body = json.dumps({"dataframe_split": {"columns": ["question", "context"], "data": [
            ["Who founded the company?", "The company was founded by Ada Lovelace in London."]]}}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    predictions = json.loads(response.read())["predictions"]
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        assert predictions[0]["answer"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=20)


@pytest.mark.full_data
def test_full_squad_subset_meets_the_quality_bar():
    """The shipped data: tuned F1 >= 50 and at least 20 points over the base heuristic (measured: 51.7 and 29.8;
    the issue's first bar was 35 and 15)."""
    result = run_tune(load_config(ROOT / "experiments" / "squad_local.yaml", {"poll_interval": "0.2"}))
    f1, base = result.metrics["eval_f1"], result.metrics["base_eval_f1"]
    assert f1 >= 50.0 and f1 - base >= 20.0, f"tuned F1 {f1:.1f}, base F1 {base:.1f}"


def test_a_champion_moved_by_someone_else_stops_the_promotion(small_squad):
    """Two promotions racing: the one that finds the champion changed under it refuses instead of clobbering."""
    from finetune_mlflow.errors import FinetuneError
    from finetune_mlflow.steps.promote import _move_aliases

    run_main(small_config(small_squad, epochs="1"))
    run_main(small_config(small_squad, epochs="1", max_examples="40"))
    client = MlflowClient()
    champion = str(client.get_model_version_by_alias("squad-qa-local", "champion").version)
    other = "2" if champion == "1" else "1"
    # This promotion decided while `champion` pointed at `other`; meanwhile it moved.
    with pytest.raises(FinetuneError, match="changed to .* during this promotion"):
        _move_aliases(client, "squad-qa-local", "champion", champion, expected_champion=other)
    assert str(client.get_model_version_by_alias("squad-qa-local", "champion").version) == champion


def test_prepare_reads_data_from_an_mlflow_uri(small_squad):
    """`train_data`/`validation_data` may be URIs: here another run's prepared canonical JSONL."""
    from finetune_mlflow.steps.prepare import run_prepare

    first = run_prepare(small_config(small_squad))
    again = run_prepare(small_config(small_squad, train_data=f"runs:/{first.run_id}/prepared/train.jsonl",
                                     validation_data=f"runs:/{first.run_id}/prepared/validation.jsonl"))
    assert again.split("train") == first.split("train")
    assert again.split("validation") == first.split("validation")
    assert MlflowClient().get_run(again.run_id).data.metrics["n_duplicates_dropped"] == 0

"""The report built from runs logged into this test's MLflow store: by experiment, by parent, by run ids, and
attached to a parent run; what is not a finished tune run is skipped and counted."""

from __future__ import annotations

import time

import mlflow
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.report import from_experiment, from_parent, from_run_ids, log_children_report, log_report

EXPERIMENT = "squad-local"


def _run(client: MlflowClient, experiment_id: str, name: str, step: str, *, parent: str | None = None,
         status: str = "FINISHED", params: dict | None = None, metrics: dict | None = None,
         tags: dict | None = None) -> str:
    run_tags = {"finetune.step": step, **(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
    now = int(time.time() * 1000)
    points = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
    if "eval_f1" in (metrics or {}):  # a loss history, step by step, as tune streams it
        points += [Metric("train_loss", 3.0 - s / 10, now + s, s) for s in range(1, 11)]
        points += [Metric("val_loss", 2.5 - s / 20, now + s, s) for s in (5, 10)]
    client.log_batch(run_id, metrics=points)
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    client.set_terminated(run_id, status)
    return run_id


def _tune(client: MlflowClient, experiment_id: str, parent: str, epochs: int, f1: float, base: str = "",
          own: dict | None = None) -> str:
    """A tune run whose base scores live on the `base` evaluation run, or (an older run) in `own` metrics."""
    return _run(client, experiment_id, f"tune local/span-ranker-base e{epochs}", "tune", parent=parent or None,
                params={"provider": "local", "base_model": "span-ranker-base", "epochs": str(epochs),
                        "learning_rate": "0.005", "batch_size": "32"},
                metrics={"eval_f1": f1, "eval_f1_ci_low": f1 - 2, "eval_f1_ci_high": f1 + 2,
                         "eval_exact_match": f1 - 9, "eval_f1_delta": f1 - 29.8,
                         "latency_ms_p95": 1.2, "estimated_cost_usd": 0.0, **(own or {})},
                tags={"finetune.base_eval_run_id": base} if base else None)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """One store for the module (creating an SQLite store takes seconds): a sweep parent with three finished tune
    children, a failed one, a prepare child and one without eval_f1; a synced OpenAI job outside the sweep; a
    tune run in another experiment."""
    folder = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(folder / "artifacts"))
    parent = _run(client, experiment_id, "sweep", "sweep", status="RUNNING")
    base = _run(client, experiment_id, "evaluate-base-local", "evaluate", parent=parent,
                metrics={"eval_f1": 29.8, "eval_exact_match": 19.7, "latency_ms_p95": 0.9})
    ids = {"parent": parent, "base": base, **{f"e{e}": _tune(client, experiment_id, parent, e, f1, base)
                                              for e, f1 in ((1, 33.9), (2, 36.4), (3, 35.0))}}
    _run(client, experiment_id, "tune local e9", "tune", parent=parent, status="FAILED")
    _run(client, experiment_id, "prepare squad", "prepare", parent=parent)
    _run(client, experiment_id, "tune local e4", "tune", parent=parent, metrics={"completed_step_count": 3})
    ids["synced"] = _run(client, experiment_id, "sync openai ftjob-1", "sync", tags={"finetune.job_id": "ftjob-1"},
                         params={"provider": "openai", "base_model": "gpt-4o-mini", "hp.n_epochs": "2",
                                 "hp.learning_rate_multiplier": "1.8", "hp.batch_size": "auto"},
                         metrics={"eval_f1": 70.0, "estimated_cost_usd": 0.9, "eval_f1_delta": 9.0})
    _run(client, experiment_id, "sync openai", "sync")  # the sync parent: no job of its own
    other = client.create_experiment("elsewhere", artifact_location=str(folder / "elsewhere"))
    ids["elsewhere"] = _tune(client, other, parent="", epochs=5, f1=40.0, own={"base_eval_f1": 31.0})
    return uri, ids


@pytest.fixture
def sweep(store, monkeypatch) -> dict[str, str]:
    """The module's store as this test's tracking store (conftest resets the URI afterwards)."""
    uri, ids = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return ids


def test_experiment_holds_every_finished_tuning_run_and_counts_the_rest(sweep):
    collected = from_experiment(EXPERIMENT)
    assert {r.run_id for r in collected.records} == {sweep["e1"], sweep["e2"], sweep["e3"], sweep["synced"]}
    assert collected.skipped == {"FAILED": 1,
                                 "finished without eval_f1 (job not done at sync, or evaluation missing)": 1}
    e2 = next(r for r in collected.records if r.run_id == sweep["e2"])
    # The base model's scores are read from the base evaluation run, where they are logged once.
    assert (e2.metric("base_eval_f1"), e2.metric("base_eval_exact_match"), e2.metric("base_latency_ms_p95")) == \
        (29.8, 19.7, 0.9)
    assert "base_eval_f1" not in MlflowClient().get_run(sweep["e2"]).data.metrics
    assert (e2.epochs, e2.learning_rate, e2.batch_size, e2.provider) == (2.0, 0.005, 32.0, "local")
    assert e2.curves["train_loss"].steps == tuple(range(1, 11)) and e2.curves["val_loss"].values == (2.25, 2.0)
    synced = next(r for r in collected.records if r.run_id == sweep["synced"])
    assert (synced.epochs, synced.learning_rate, synced.batch_size) == (2.0, 1.8, None)  # "auto" is unknown


def test_parent_holds_its_tune_children_only(sweep):
    collected = from_parent(sweep["parent"])
    assert [r.run_name for r in collected.records] == [f"tune local/span-ranker-base e{e}" for e in (1, 2, 3)]
    assert collected.skipped["not a tune run (finetune.step=prepare)"] == 1
    assert sum(collected.skipped.values()) == 4


def test_run_ids_reach_across_experiments_and_unknown_ids_are_refused(sweep):
    collected = from_run_ids([sweep["elsewhere"], sweep["e1"], sweep["parent"]])
    assert [r.run_id for r in collected.records] == [sweep["elsewhere"], sweep["e1"]]
    assert collected.records[0].metric("base_eval_f1") == 31.0  # an older run's own base_* metrics are kept
    assert collected.skipped == {"not a tune run (finetune.step=sweep)": 1}
    with pytest.raises(ConfigError, match="no such run .*: 0123456789abcdef"):
        from_run_ids([sweep["e1"], "0123456789abcdef"])


def test_report_command_writes_both_files(sweep, tmp_path, capsys):
    assert main(["report", "--experiment", EXPERIMENT, "--out", str(tmp_path / "by-experiment")]) == 0
    page = (tmp_path / "by-experiment" / "report.html").read_text(encoding="utf-8")
    assert "Winner: sync openai ftjob-1" in page and page.count("data:image/png;base64,") == 4
    assert main(["report", "--parent", sweep["parent"], "--out", str(tmp_path / "by-parent")]) == 0
    markdown = (tmp_path / "by-parent" / "report.md").read_text(encoding="utf-8")
    assert "Winner: tune local/span-ranker-base e2" in markdown and "Skipped 4 run(s)" in markdown
    assert "winner tune local/span-ranker-base e2" in capsys.readouterr().out


def test_report_command_refuses_no_selection_two_or_an_unknown_one(sweep, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["report", "--out", str(out)]) == 2
    assert main(["report", "--experiment", "x", "--parent", "y", "--out", str(out)]) == 2
    assert "exactly one of --experiment" in capsys.readouterr().err
    assert main(["report", "--experiment", "no-such", "--out", str(out)]) == 2
    assert "--experiment 'no-such': no such MLflow experiment" in capsys.readouterr().err
    assert main(["report", "--parent", "0123456789abcdef", "--out", str(out)]) == 2
    assert not out.exists()


def test_log_report_attaches_both_files_to_the_parent(sweep):
    collected = from_parent(sweep["parent"])
    log_report(sweep["parent"], collected.records, skipped=collected.skipped)
    report = log_children_report(sweep["parent"])  # the same, as sweep and main call it
    assert "Winner: tune local/span-ranker-base e2" in report.markdown
    client = MlflowClient()
    assert {a.path for a in client.list_artifacts(sweep["parent"], "report")} == {"report/report.md",
                                                                                   "report/report.html"}

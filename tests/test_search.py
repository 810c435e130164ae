"""Optuna search under `sweep`: a space refused with file:line before anything starts, pruning that stops the
trial's local trainer and ends its run KILLED with the pruner's reason, a rerun that trains nothing twice, and the
honest choice among trials."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main as cli_main
from finetune_mlflow.config import load_config, read_raw_section, section_lines, with_overrides
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.liveness import pid_alive
from finetune_mlflow.search.choice import TrialOutcome, compare
from finetune_mlflow.search.pruning import cost_avoided
from finetune_mlflow.search.space import check_space, plan_search
from finetune_mlflow.search.study import redacted

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, sweep: str, name: str = "search.yaml") -> Path:
    path = tmp_path / name
    path.write_text("tune: {provider: local}\nsweep:\n" + sweep, encoding="utf-8")
    return path


@pytest.mark.parametrize(("sweep", "line", "message"), [
    ("  search: bayes\n  n_trials: 2\n", 3, "sweep.search is 'bayes'; expected grid, random or tpe"),
    ("  search: tpe\n  n_trials: 0\n  space: {epochs: {choices: [1]}}\n", 4, r"sweep.n_trials is 0; expected an integer >= 1"),
    ("  search: tpe\n  space: {epochs: {choices: [1]}}\n", 2, "sweep.n_trials is required"),
    ("  search: tpe\n  n_trials: 2\n  space:\n    epoch: {choices: [1, 2]}\n", 6, "unknown knob 'epoch'"),
    ("  search: tpe\n  n_trials: 2\n  space:\n    learning_rate: {low: 0, high: 0.1, log: true}\n", 6,
     "a log range needs low > 0"),
    ("  search: tpe\n  n_trials: 2\n  space:\n    learning_rate: {low: 0.1, high: 0.01}\n", 6, "must be below high"),
    ("  search: tpe\n  n_trials: 2\n  space:\n    epochs: {low: 1, high: 2.5}\n", 6, "tune.epochs takes integers"),
    ("  search: tpe\n  n_trials: 2\n  space:\n    epochs: {choices: [1, 1]}\n", 6, "distinct values"),
    ("  search: tpe\n  n_trials: 2\n  space:\n    tune.provider: {low: 1, high: 2}\n", 6, "not a numeric knob"),
    ("  search: tpe\n  n_trials: 2\n  space: {epochs: {choices: [1]}}\n  pruner: asha\n", 6, "sweep.pruner is 'asha'"),
    ("  search: tpe\n  n_trials: 2\n  space: {epochs: {choices: [1]}}\n  grid: {epochs: [1]}\n", 6,
     "sweep.grid is for search: grid"),
    ("  search: tpe\n  n_trials: 2000\n  space: {epochs: {choices: [1]}}\n", 4, "over sweep.max_trials=1000"),
])
def test_a_search_that_cannot_run_is_refused_with_file_and_line(tmp_path, sweep, line, message):
    path = _write(tmp_path, sweep)
    raw = __import__("yaml").safe_load(path.read_text())["sweep"]
    with pytest.raises(ConfigError, match=message) as caught:
        plan_search(raw, str(path), section_lines(path, "sweep"))
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_every_corner_of_the_space_is_validated_like_a_parameter(tmp_path):
    path = _write(tmp_path, "  search: random\n  n_trials: 3\n  space:\n    epochs: {low: 1, high: 3}\n"
                  "    learning_rate: {low: 0.001, high: 200, log: true}\n")
    plan = plan_search(__import__("yaml").safe_load(path.read_text())["sweep"], str(path), section_lines(path, "sweep"))
    assert [d.kind for d in plan.space] == ["int", "float"] and len(plan.corners()) == 4
    with pytest.raises(ConfigError, match=rf"^{path}:7: sweep.space.learning_rate: .*tune.learning_rate is 200"):
        check_space(plan, load_config(path), with_overrides, str(path), section_lines(path, "sweep"))


def test_the_shipped_search_plans_and_every_corner_is_a_valid_config():
    path = ROOT / "experiments" / "search_local.yaml"
    plan = plan_search(read_raw_section(path, "sweep"), str(path), section_lines(path, "sweep"))
    assert (plan.method, plan.n_trials, plan.pruner) == ("tpe", 12, "median")
    assert {d.key: d.log for d in plan.space} == {"tune.learning_rate": True, "tune.epochs": False}
    corners = check_space(plan, load_config(path), with_overrides, str(path))
    assert min((c.tune.learning_rate, c.tune.epochs) for c in corners) == (0.001, 1) and len(corners) == 6


def test_a_refused_search_exits_2_before_any_run_starts(tmp_path, capsys):
    path = _write(tmp_path, "  search: tpe\n  n_trials: 2\n  space:\n    max_span_tokens: {low: 1, high: 99}\n")
    assert cli_main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}:")
    assert MlflowClient().search_runs(["0"]) == []


def test_storage_passwords_never_reach_tags_and_join_needs_a_search(tmp_path, capsys):
    assert redacted("postgresql://u:s3cret@db:5432/optuna") == "postgresql://u:***@db:5432/optuna"
    grid = tmp_path / "grid.yaml"
    grid.write_text("sweep:\n  grid: {epochs: [1]}\n", encoding="utf-8")
    assert cli_main(["sweep", "--config", str(grid), "--join", "true"]) == 2
    assert "join=true adds a worker to a search" in capsys.readouterr().err


def test_cost_avoided_is_the_estimate_of_the_steps_not_trained():
    assert cost_avoided(10.0, 25, 100) == pytest.approx(7.5)
    assert cost_avoided(None, 25, 100) is None and cost_avoided(10.0, 25, None) is None


def _outcome(number, f1s, **kw):
    return TrialOutcome(number, f"r{number}", "COMPLETE", {}, sum(f1s) / len(f1s) * 1.0,
                        f1_by_question={str(i): v for i, v in enumerate(f1s)}, **kw)


def test_trials_inside_the_winners_interval_are_not_distinguishable_and_the_cheaper_is_recommended():
    base = [100.0, 0.0] * 50
    winner = _outcome(0, base, trained=3000)
    alike = _outcome(1, base[:-2] + [0.0, 0.0], trained=1000)  # one question worse: inside the noise
    worse = _outcome(2, [0.0] * 100, trained=500)
    choice = compare([winner, alike, worse, TrialOutcome(3, "r3", "PRUNED", {})], samples=200)
    verdicts = {c.outcome.number: c.distinguishable for c in choice.compared}
    assert choice.winner.number == 0 and verdicts == {0: False, 1: False, 2: True}
    assert choice.recommended.number == 1 and "trained on 1000 instead of 3000" in choice.reason


SEARCH = """
data: {{train_data: {train}, validation_data: {validation}, max_examples: 200, max_validation_examples: 40}}
tune: {{provider: local, batch_size: 16, poll_interval: 0.05}}
evaluate: {{max_concurrency: 1, bootstrap_samples: 100, trace_samples: 0, checkpoints: last}}
local: {{eval_every_steps: 2, validation_loss_examples: 40}}
sweep:
  search: random
  n_trials: 2
  space:
    learning_rate: {{choices: [0.05, 0.0000001]}}
    epochs: {{choices: {epochs}}}
  pruner: median
  pruner_startup_trials: 1
  max_parallel_jobs: 1
  storage: {storage}
  study_name: {study}
"""


def test_a_losing_trial_is_pruned_with_its_trainer_stopped_and_a_rerun_trains_nothing_twice(
        tmp_path, small_squad, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    storage = tmp_path / "study.journal"
    path = tmp_path / "search.yaml"
    path.write_text(SEARCH.format(train=small_squad[0], validation=small_squad[1], storage=storage, study="s1",
                                  epochs="[1, 40]"),
                    encoding="utf-8")
    # The order of the points is fixed (Optuna's own enqueue): a fast learner completes, then a learner with a
    # step too small to move the loss starts and is pruned at its first val_loss point past the median.
    study = optuna.create_study(study_name="s1", direction="maximize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(storage))))
    study.enqueue_trial({"tune.learning_rate": 0.05, "tune.epochs": 1})
    # The loser trains long enough (40 epochs) that no poll, however late under load, finds it already ended.
    study.enqueue_trial({"tune.learning_rate": 0.0000001, "tune.epochs": 40})
    assert cli_main(["sweep", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    client = MlflowClient()
    parent = client.search_runs(["0"], "tags.`finetune.step` = 'sweep'")[0]
    trials = {r.data.tags["finetune.trial_number"]: r for r in client.search_runs(
        ["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`finetune.step` = 'tune'")}
    assert set(trials) == {"0", "1"} and trials["0"].info.status == "FINISHED"
    pruned = trials["1"]
    assert pruned.info.status == "KILLED" and pruned.data.tags["finetune.study"] == "s1"
    reason = pruned.data.tags["finetune.end_reason"]
    assert reason.startswith(f"pruned at step {pruned.data.tags['finetune.pruned_step']} (val_loss ")
    assert "vs median" in reason and reason in out
    job_dir = Path(load_config(path).local.jobs_dir or tmp_path / "home" / "local-jobs") / \
        pruned.data.tags["finetune.job_id"]
    assert json.loads((job_dir / "status.json").read_text())["state"] == "cancelled"
    trainer = json.loads((job_dir / "pid.json").read_text())["pid"]
    assert not pid_alive(trainer)
    steps = json.loads((job_dir / "spec.json").read_text())["total_steps"]
    assert int(pruned.data.tags["finetune.pruned_step"]) < steps  # stopped before its end
    assert parent.data.metrics["search_n_pruned"] == 1 and parent.data.metrics["search_n_complete"] == 1
    assert parent.data.tags["finetune.winner_run_id"] == trials["0"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/report.md", "search/history.png", "search/trials.json"} <= artifacts
    report = Path(client.download_artifacts(parent.info.run_id, "search/report.md", str(tmp_path))).read_text()
    assert "**pruned**" in report and "Recommended: trial 0" in report
    production = load_config(path).tune.registered_model_name
    registered = client.search_model_versions(f"name = '{production}'")  # only the chosen trial
    assert [v.run_id for v in registered] == [trials["0"].info.run_id]
    assert parent.data.tags["finetune.registered_version"] == f"{production}/{registered[0].version}"

    # The same parent again (--run-id): the study is continued, both trials are kept, nothing is launched.
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    jobs = sorted(p.name for p in job_dir.parent.iterdir())
    assert cli_main(["sweep", "--config", str(path)]) == 0
    assert "launching" not in capsys.readouterr().out
    assert sorted(p.name for p in job_dir.parent.iterdir()) == jobs
    assert len(client.search_runs(["0"], "tags.`finetune.step` = 'tune'")) == 2
    assert len(client.search_model_versions(f"name = '{production}'")) == 1
    assert len(optuna.load_study(study_name="s1", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(storage)))).trials) == 2


def _study(storage: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(storage))))


def _until(what: str, check, process: subprocess.Popen, limit: float = 600):
    """Poll `check` until it returns something truthy; fail if `process` ended first (progress, not a guess)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert process.poll() is None, f"the owner ended (rc {process.returncode}) before {what}"
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {limit} s")


def test_two_workers_on_one_journal_survive_a_kill_9_and_train_no_trial_twice(tmp_path, small_squad, monkeypatch):
    storage = tmp_path / "study.journal"
    path = tmp_path / "search.yaml"
    path.write_text(SEARCH.format(train=small_squad[0], validation=small_squad[1], storage=storage, study="w",
                                  epochs="[1, 3]")
                    .replace("pruner: median", "pruner: none").replace("[1, 3]", "[1, 2]"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "finetune_mlflow", "sweep", "--config", str(path)]
    logs = contextlib.ExitStack()
    owner_log = logs.enter_context((tmp_path / "owner.log").open("wb"))
    joiner_log = logs.enter_context((tmp_path / "joiner.log").open("wb"))
    owner = subprocess.Popen(command, cwd=ROOT, env=env, stdout=owner_log, stderr=subprocess.STDOUT)
    joiner = None
    try:
        _until("a ready study", lambda: storage.exists() and _study(storage, "w").user_attrs.get("ready"), owner)
        joiner = subprocess.Popen(command + ["--join", "true"], cwd=ROOT, env=env, stdout=joiner_log,
                                  stderr=subprocess.STDOUT)
        client = MlflowClient()

        def joiners_training_trial():
            for trial in _study(storage, "w").get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                run_id = trial.user_attrs.get("run_id")
                if str(trial.user_attrs.get("finetune.worker", "")).endswith(f":{joiner.pid}") and run_id \
                        and "finetune.job_id" in client.get_run(run_id).data.tags:
                    return trial
            return None

        killed = _until("a trial of the joined worker training", joiners_training_trial, owner)
        joiner.kill()  # kill -9: no handler runs in the worker
        joiner.wait()
        assert owner.wait(timeout=900) == 0, (tmp_path / "owner.log").read_text()[-3000:]
    finally:
        for process in (owner, joiner):
            if process is not None and process.poll() is None:
                process.kill()
        logs.close()
    trials = _study(storage, "w").get_trials()
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.state is optuna.trial.TrialState.COMPLETE and retry.user_attrs["run_id"] == killed.user_attrs["run_id"]
    assert retry.params == killed.params
    assert sum(t.state is optuna.trial.TrialState.COMPLETE for t in trials) == 2  # n_trials, the retry included
    runs = MlflowClient().search_runs(["0"], "tags.`finetune.step` = 'tune'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    jobs = [p.name for p in (tmp_path / "home" / "local-jobs").iterdir()]
    assert sorted(jobs) == sorted(r.data.tags["finetune.job_id"] for r in runs)  # one job per trial, none twice
    assert not MlflowClient().search_runs(["0"], "attributes.status = 'RUNNING'")


def test_a_pruned_hosted_trial_gets_exactly_one_cancel_call_and_logs_the_cost_avoided(tmp_path, monkeypatch):
    """The pruning hook of a trial's tune process, on a real OpenAI client against the fake: a val_loss worse than
    the completed trial's at the same step cancels the job once and ends the run's story with the pruner's reason."""
    from finetune_mlflow.errors import RunStopped
    from finetune_mlflow.providers.base import MetricPoint
    from finetune_mlflow.providers.openai.provider import OpenAIProvider
    from finetune_mlflow.search.pruning import TRIAL_ENV, trial_pruner
    from tests.fakes.openai_server import FakeOpenAI, JobScript
    from tests.test_openai_provider import (
        API_KEY,
        make_config,
        make_request,
        write_prepared,
    )

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    storage = tmp_path / "study.journal"
    study = optuna.create_study(study_name="hosted", direction="maximize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(storage))))
    study.add_trial(optuna.trial.create_trial(value=80.0, intermediate_values={2: -0.5}))
    trial = study.ask()
    spec = {"storage": str(storage), "study": "hosted", "trial_id": trial._trial_id, "number": trial.number,
            "worker_pid": os.getppid(), "pruner": {"pruner": "median", "warmup": 0, "startup": 1, "min_steps": 1,
                                                   "factor": 3}}
    monkeypatch.setenv(TRIAL_ENV, json.dumps(spec))
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    with FakeOpenAI() as server:
        server.script_next_job(JobScript(statuses=["running"] * 50, n_steps=20))
        provider = OpenAIProvider(make_config(server), sleep=lambda s: None)
        try:
            job = provider.start_job(make_request(write_prepared(tmp_path, n_train=20), run_id=run_id))
            job = provider.get_job(job.job_id)
            client.log_metric(run_id, "estimated_cost_usd", 4.0)
            client.log_metric(run_id, "n_train", 20)
            hook = trial_pruner(provider, run_id)
            hook(job, [MetricPoint("train_loss", 1.9, 1, 0)])  # no validation loss yet: nothing to judge
            with pytest.raises(RunStopped, match=r"^pruned at step 2 \(val_loss 1.9 vs median 0.5 of 1 completed"):
                hook(job, [MetricPoint("val_loss", 1.9, 2, 0)])
        finally:
            provider.close()
        cancels = [r for r in server.requests if r[0] == "POST" and r[1].endswith("/cancel")]
        assert len(cancels) == 1 and server.jobs[job.job_id].obj["status"] == "cancelled"
    run = client.get_run(run_id)
    assert run.data.tags["finetune.pruned_step"] == "2"
    hp = job.hyperparameters
    steps = int(hp["epochs"]) * -(-20 // int(hp["batch_size"]))
    assert run.data.metrics["pruned_cost_avoided_usd"] == pytest.approx(4.0 * (1 - 2 / steps), abs=1e-4)

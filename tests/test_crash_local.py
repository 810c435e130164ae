"""Crash safety of `tune` with the local provider: `kill -9` the step mid-job, rerun it with the same run id (what
`mlflow run --run-id` does) and the run completes with one job, every loss point exactly once, one model version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.waiting import folder_state, process_progress, run_watched, until

CONFIG = ROOT / "experiments" / "squad_local.yaml"
MODEL_NAME = "squad-qa-local"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SQLite store's default artifact root is ./mlruns


def tune_command(small_squad, *extra: str) -> list[str]:
    train, validation = small_squad
    # ~600 train examples x 3 epochs at batch 32: ~57 steps (well under a second of training).
    return [sys.executable, "-m", "finetune_mlflow", "tune", "--config", str(CONFIG), "--train_data", str(train),
            "--validation_data", str(validation), "--epochs", "3", "--poll_interval", "0.2", *extra]


def start(command: list[str], run_id: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_RUN_ID": run_id}
    with log.open("ab") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=os.getcwd())


def wait_for(condition, process: subprocess.Popen, log: Path) -> None:
    """Until the kill point, while tune (or the trainer it launched) keeps moving; see tests/waiting.py."""
    def reached() -> bool:
        if process.poll() is not None:
            pytest.fail(f"tune exited ({process.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        return bool(condition())

    jobs = Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs"
    try:
        until(reached, lambda: (process_progress(process, log)(), folder_state(jobs)), what="the kill point")
    except AssertionError:
        process.kill()
        pytest.fail(f"kill point not reached, nothing moving:\n{log.read_text()[-3000:]}")


def kill_then_rerun(small_squad, tmp_path, condition, *extra: str) -> tuple[MlflowClient, str, int]:
    """Returns the client, the run id and how many train_loss points the run held when tune was killed."""
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    command = tune_command(small_squad, *extra)
    log = tmp_path / "tune.log"
    process = start(command, run_id, log)
    try:
        wait_for(lambda: condition(client, run_id), process, log)
    finally:
        os.kill(process.pid, signal.SIGKILL)  # only the tune step: the detached trainer keeps going, like a cloud job
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody got the chance to end it
    logged_before_kill = len(client.get_metric_history(run_id, "train_loss"))

    rerun = run_watched(command, env={**os.environ, "MLFLOW_RUN_ID": run_id}, cwd=os.getcwd())
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert "reattaching instead of launching another" in rerun.stderr
    return client, run_id, logged_before_kill


def assert_completed_once(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    jobs_root = Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs"
    jobs = sorted(p.name for p in jobs_root.iterdir())
    assert jobs == [run.data.tags["finetune.job_id"]], "the rerun must reattach, not start a second job"
    events = [json.loads(line) for line in (jobs_root / jobs[0] / "events.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_loss"):
        expected = sorted(e["step"] for e in events if e["key"] == key)
        assert expected, f"the job wrote no {key}"
        logged = Counter(m.step for m in client.get_metric_history(run_id, key))
        assert [step for step, count in logged.items() if count > 1] == [], f"{key} steps logged twice"
        assert sorted(logged) == expected, f"{key} steps missing or extra"
        values = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert all(values[e["step"]] == pytest.approx(e["value"]) for e in events if e["key"] == key)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}' and run_id = '{run_id}'")
    assert len(versions) == 1, [v.version for v in versions]
    assert run.data.tags["finetune.registered_version"] == f"{MODEL_NAME}/{versions[0].version}"


def test_kill_during_training_then_rerun_reattaches(small_squad, tmp_path):
    def training(client: MlflowClient, run_id: str) -> bool:
        return ("finetune.job_id" in client.get_run(run_id).data.tags
                and len(client.get_metric_history(run_id, "train_loss")) > 0)

    # Batch 4 for 12 epochs: ~1,800 steps, a few seconds of training, so the kill lands mid-job and the rerun has
    # to pick up points that were written while nobody watched.
    client, run_id, before = kill_then_rerun(small_squad, tmp_path, training, "--epochs", "12", "--batch_size", "4")
    assert_completed_once(client, run_id)
    assert 0 < before < len(client.get_metric_history(run_id, "train_loss"))


@pytest.mark.parametrize("tag", ["finetune.tuned_model", "finetune.base_eval_run_id"],
                         ids=["during-evaluation", "before-registration"])
def test_kill_after_training_then_rerun_registers_once(small_squad, tmp_path, tag):
    client, run_id, _ = kill_then_rerun(small_squad, tmp_path,
                                     lambda client, run_id: tag in client.get_run(run_id).data.tags)
    assert_completed_once(client, run_id)

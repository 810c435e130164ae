"""Crash safety, round two, with real processes and real signals: SIGTERM during evaluation, kill -9 during the base
evaluation, two owners for one run, a dead local trainer, `cancel`, and a diverging job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main
from tests.conftest import ROOT, SQUAD_VALIDATION
from tests.test_bad_input import VALID, all_runs
from tests.test_crash_local import CONFIG, assert_completed_once, start, tune_command, wait_for
from tests.waiting import process_progress, run_watched, until


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The processes run from tmp_path: make them import this checkout, not whatever is installed.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def new_run() -> tuple[MlflowClient, str]:
    client = MlflowClient()
    return client, client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id


def children(client: MlflowClient, run_id: str, step: str) -> list:
    return [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == run_id
            and r.data.tags.get("finetune.step") == step]


def rerun(command: list[str], run_id: str) -> subprocess.CompletedProcess:
    return run_watched(command, env={**os.environ, "MLFLOW_RUN_ID": run_id}, cwd=os.getcwd())


def launch(small_squad, tmp_path, *extra: str) -> tuple[MlflowClient, str, list[str], Path, subprocess.Popen]:
    """A tune process on a fresh run: (client, run id, its command, its log, the process)."""
    client, run_id = new_run()
    command = tune_command(small_squad, *extra)
    log = tmp_path / "tune.log"
    return client, run_id, command, log, start(command, run_id, log)


def jobs_root() -> Path:
    return Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs"


def test_sigterm_during_evaluation_ends_every_run_and_the_rerun_completes(small_squad, tmp_path):
    # All 1,342 shipped validation questions: an evaluation of the 120 small ones can end before the signal lands.
    client, run_id, command, log, process = launch(small_squad, tmp_path, "--validation_data", str(SQUAD_VALIDATION))
    wait_for(lambda: any(r.info.status == "RUNNING" for r in children(client, run_id, "evaluate")), process, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    errors = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert errors == ["error: terminated by SIGTERM; runs ended KILLED, a started job keeps running: rerun with "
                      "--run-id <run> to reattach"], log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert [r.info.status for r in all_runs() if r.info.status == "RUNNING"] == []
    assert client.get_run(run_id).info.status == "KILLED"
    (evaluation,) = children(client, run_id, "evaluate")
    assert evaluation.info.status == "KILLED"
    assert "Terminated" in evaluation.data.tags["finetune.end_reason"]

    again = rerun(command, run_id)
    assert again.returncode == 0, again.stderr[-4000:]
    assert_completed_once(client, run_id)


def test_kill_9_during_base_evaluation_then_rerun_ends_the_stale_child(small_squad, tmp_path):
    client, run_id, command, log, process = launch(small_squad, tmp_path, "--validation_data", str(SQUAD_VALIDATION))
    wait_for(lambda: any(r.info.status == "RUNNING" for r in children(client, run_id, "evaluate")), process, log)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    (orphan,) = children(client, run_id, "evaluate")
    if client.get_run(orphan.info.run_id).info.status != "RUNNING":
        pytest.skip("the evaluation finished before the kill landed")

    again = rerun(command, run_id)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"ended stale evaluate child run {orphan.info.run_id}" in again.stderr, [
        line for line in again.stderr.splitlines() if "WARN" in line or "rror" in line]
    ended = client.get_run(orphan.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["finetune.end_reason"].startswith("stale: ")
    assert [r.info.run_id for r in all_runs() if r.info.status == "RUNNING"] == []
    assert_completed_once(client, run_id)


def test_second_owner_of_a_run_is_refused_and_touches_nothing(small_squad, tmp_path):
    client, run_id, command, log, first = launch(small_squad, tmp_path, "--epochs", "12", "--batch_size", "4")
    try:
        wait_for(lambda: "finetune.job_id" in client.get_run(run_id).data.tags, first, log)
        before = client.get_run(run_id)
        second = rerun(command, run_id)
        assert second.returncode == 2, second.stderr[-3000:]
        (message,) = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert message.startswith(f"error: run {run_id} is in use by ") and f":{first.pid}" in message, message
        after = client.get_run(run_id)
        assert after.info.status == "RUNNING" and after.data.tags["finetune.owner"].endswith(f":{first.pid}")
        assert after.data.params == before.data.params
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert_completed_once(client, run_id)


def test_dead_trainer_is_restarted_on_the_same_job(small_squad, tmp_path):
    client, run_id, command, log, process = launch(small_squad, tmp_path, "--epochs", "12", "--batch_size", "4")
    wait_for(lambda: len(client.get_metric_history(run_id, "train_loss")) > 0, process, log)
    job_dir = jobs_root() / client.get_run(run_id).data.tags["finetune.job_id"]
    trainer = json.loads((job_dir / "pid.json").read_text())["pid"]
    os.kill(process.pid, signal.SIGKILL)
    os.kill(trainer, signal.SIGKILL)
    process.wait(timeout=30)

    again = rerun(command, run_id)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "restarted it from scratch" in again.stderr
    assert len(json.loads((job_dir / "restarts.json").read_text())) == 1
    assert_completed_once(client, run_id)


def test_cancel_by_run_id_stops_the_local_trainer_and_the_watching_tune_fails(small_squad, tmp_path, capsys):
    client, run_id, command, log, process = launch(small_squad, tmp_path, "--epochs", "100", "--batch_size", "1")
    try:
        wait_for(lambda: len(client.get_metric_history(run_id, "train_loss")) > 0, process, log)
        job_id = client.get_run(run_id).data.tags["finetune.job_id"]
        trainer = json.loads((jobs_root() / job_id / "pid.json").read_text())["pid"]
        assert main(["cancel", "--config", str(CONFIG), "--run_id", run_id]) == 0
        assert f"{job_id}: cancelled" in capsys.readouterr().out
        # Until the trainer is gone, while it still runs its SIGTERM handler (it stops using CPU only when stuck).
        until(lambda: not Path(f"/proc/{trainer}").exists(), process_progress(trainer),
              what="the trainer's process group to end on SIGTERM")
        assert process.wait(timeout=120) == 2
    finally:
        if process.poll() is None:
            process.kill()
    assert f"tuning job {job_id} ended cancelled" in log.read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "cancelled" in run.data.tags["finetune.end_reason"]
    assert main(["cancel", "--config", str(CONFIG), "--job_id", "../../etc"]) == 2
    assert "is not a local job id" in capsys.readouterr().err


def test_a_loss_that_is_no_longer_a_number_fails_the_job_as_diverged(tmp_path):
    """The span ranker's Adam steps keep its loss finite at every learning rate the config allows (it is bounded),
    so divergence is checked where it is decided: a non-finite point ends the trainer's job as `diverged`."""
    from finetune_mlflow.providers.job_dir import run_trainer
    from finetune_mlflow.providers.local.trainer import _event_lines
    from finetune_mlflow.providers.local.span_model import StepReport

    report = StepReport(step=7, epoch=0, train_loss=float("nan"), val_loss=None, epoch_end=False)
    (tmp_path / "status.json").write_text(json.dumps({"state": "running"}))
    assert run_trainer(tmp_path, lambda job_dir: _event_lines(report)) == 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["error_code"] == "diverged"
    assert "train_loss nan at step 7" in status["error_message"]


def test_kill_9_while_logging_the_model_then_rerun_cleans_the_pending_model(small_squad, tmp_path):
    client, run_id = new_run()
    experiment_id = client.get_run(run_id).info.experiment_id
    command = tune_command(small_squad)
    log = tmp_path / "tune.log"
    process = start(command, run_id, log)

    def models(status: str) -> list:
        return [m for m in client.search_logged_models(experiment_ids=[experiment_id],
                                                       filter_string=f"source_run_id = '{run_id}'")
                if m.status.value == status]

    wait_for(lambda: models("PENDING"), process, log)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    (pending,) = models("PENDING")

    again = rerun(command, run_id)
    assert again.returncode == 0, again.stderr[-4000:]
    # The model the run's evaluation is linked to (created PENDING before evaluating) is logged into and finished
    # by the rerun; any other PENDING model (a registration killed while logging a winning checkpoint) is marked
    # FAILED with the reason, and the model is logged again. Either way: nothing PENDING, exactly one READY.
    linked = client.get_run(run_id).data.tags.get("finetune.logged_model_id")
    if pending.model_id != linked:
        assert f"logged model {pending.model_id} of run {run_id} was left PENDING" in again.stderr
        assert client.get_logged_model(pending.model_id).status.value == "FAILED"
    assert models("PENDING") == [] and len(models("READY")) == 1
    assert_completed_once(client, run_id)

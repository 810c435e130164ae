"""One run per invocation that is not left behind: `mlflow run` opens a launcher run in `Default` before our step
starts; a kill -9 of the whole `mlflow run` leaves both RUNNING, and the `--run-id` rerun must end both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from finetune_mlflow.ownership import launcher_end_status
from tests import e2e_support as e2e
from tests.conftest import ROOT


def test_launcher_end_status_follows_the_step_run():
    assert [launcher_end_status(s) for s in ("FINISHED", "FAILED", "KILLED", "RUNNING", None)] == [
        "FINISHED", "FAILED", "KILLED", "KILLED", "KILLED"]


def mlflow_run(small_squad, *extra: str) -> list[str]:
    train, validation = small_squad
    return [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "tune", "--env-manager", "local",
            "-P", f"train_data={train}", "-P", f"validation_data={validation}", "-P", "epochs=12",
            "-P", "batch_size=4", "-P", "poll_interval=0.2", *extra]


def step_experiment_id(proc: subprocess.Popen, log: Path) -> str:
    return e2e.wait_for(lambda: MlflowClient().get_experiment_by_name("squad-local"), proc, log,
                        what="the step's experiment").experiment_id


def test_kill_9_of_mlflow_run_then_run_id_rerun_leaves_no_run_running(small_squad, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")  # the README's plain `mlflow run`: a launcher in Default
    client = MlflowClient()
    client.search_experiments()  # create the SQLite tables before two processes could race to
    log = tmp_path / "mlflow-run.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(mlflow_run(small_squad), cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ))
    try:
        step = e2e.wait_for(e2e.run_with_job_tag(proc, log, step_experiment_id(proc, log)), proc, log,
                            what="the tune run's job and first losses")
    finally:
        e2e.kill_group(proc)  # mlflow run and the step with it: nothing gets to end a run
    launchers = client.search_runs(["0"], "attributes.status = 'RUNNING'")
    assert [r.data.tags.get("finetune.run_id") for r in launchers] == [step.info.run_id]
    assert client.get_run(step.info.run_id).info.status == "RUNNING"

    rerun = subprocess.run(mlflow_run(small_squad, "--run-id", step.info.run_id), cwd=ROOT, capture_output=True,
                           text=True, env=dict(os.environ))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]

    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, "attributes.status = 'RUNNING'") == []
    launcher = client.get_run(launchers[0].info.run_id)
    assert launcher.info.status == "KILLED"  # its step run was still RUNNING (stale) when the rerun began
    assert "stale launcher" in launcher.data.tags["finetune.end_reason"]
    assert client.get_run(step.info.run_id).info.status == "FINISHED"

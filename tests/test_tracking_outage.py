"""The tracking server going away mid-stream loses no metric point and logs none twice.

`tune` streams a local job into an `mlflow server`; the server is killed while points are flowing and started
again on the same port and store a few seconds later. The job keeps training meanwhile; `tune` keeps its cursor
until writes succeed again.
"""

from __future__ import annotations

from tests.e2e_support import all_experiment_ids
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.team_servers import free_port, healthy


def start_server(folder: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'store.db'}",
               "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    with (folder / "server.log").open("ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                  start_new_session=True)
    deadline = time.monotonic() + 90
    while not healthy(f"http://127.0.0.1:{port}"):
        assert server.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()[-2000:]
        time.sleep(0.3)
    return server


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def streaming_tune_run(client: MlflowClient):
    """The tune run once it has its job id and its first train_loss points (None before)."""
    for run in client.search_runs(all_experiment_ids(), "tags.`finetune.step` = 'tune'"):
        if run.data.tags.get("finetune.job_id") and client.get_metric_history(run.info.run_id, "train_loss"):
            return run
    return None


def test_metric_points_survive_a_tracking_server_outage(small_squad, tmp_path, monkeypatch):
    train, validation = small_squad
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           # A killed server refuses at once; the timeout only has to outlast a slow answer on a loaded machine.
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    command = [sys.executable, "-m", "finetune_mlflow", "tune", "--train_data", str(train), "--validation_data",
               str(validation), "--epochs", "10", "--batch_size", "4", "--poll_interval", "0.2"]
    tune = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(tracking_uri=url)
        run = wait_for(lambda: streaming_tune_run(client), 90, "train_loss points")
        stop(server)
        time.sleep(3)  # the job keeps training; every write from tune fails meanwhile
        server = start_server(tmp_path, port)
        output, _ = tune.communicate(timeout=180)
        assert tune.returncode == 0, output[-3000:]
        assert output.count("tracking store write failed") == 1, output[-3000:]  # said once, not per retry
        assert "tracking store writes succeed again after" in output
        assert "Traceback" not in output
        finished = client.get_run(run.info.run_id)
        assert finished.info.status == "FINISHED"
        job_dir = Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs" / finished.data.tags["finetune.job_id"]
        events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
        for key in ("train_loss", "val_loss"):
            served = [(e["step"], e["value"]) for e in events if e["key"] == key]
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert logged == served, key
    finally:
        if tune.poll() is None:
            tune.kill()
        stop(server)


def test_a_store_that_stays_down_stops_tune_in_bounded_time_and_says_which_runs_stay_running(small_squad, tmp_path,
                                                                                            monkeypatch):
    """The server is killed for good: tune backs off, gives up after FINETUNE_MLFLOW_STORE_OUTAGE_S, and its last
    line names the runs it could not end instead of claiming they ended."""
    train, validation = small_squad
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    env = {**os.environ, "FINETUNE_MLFLOW_STORE_OUTAGE_S": "6", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    command = [sys.executable, "-m", "finetune_mlflow", "tune", "--train_data", str(train), "--validation_data",
               str(validation), "--epochs", "100", "--batch_size", "1", "--poll_interval", "0.2"]
    tune = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(tracking_uri=url)
        run = wait_for(lambda: streaming_tune_run(client), 90, "train_loss points")
        stop(server)
        output, _ = tune.communicate(timeout=240)
    finally:
        if tune.poll() is None:
            tune.kill()
    assert tune.returncode == 2, output[-3000:]
    assert output.count("tracking store write failed") == 1 and "Traceback" not in output, output[-3000:]
    (line,) = [x for x in output.splitlines() if x.startswith("error: ")]
    assert "the tracking store took no write for" in line and f"--run-id {run.info.run_id}" in line, line
    assert f"runs {run.info.run_id} could not be marked ended" in line and "runs ended KILLED" not in line, line

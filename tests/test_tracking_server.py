"""Against a real tracking server: `mlflow server` on a fresh PostgreSQL database, artifacts served by the server.

`main` once, then four `tune` processes at the same time: every run finishes, and the registry numbers the five
versions 1..5 without gaps or clashes, one per tune run. Skipped (with the reason) only when no PostgreSQL is
reachable on 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
MODEL_NAME = "squad-qa-local"


@pytest.fixture(scope="session")
def postgres_database():
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is needed for the tracking-server test")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL reachable at {PG['host']}:{PG['port']} as {PG['user']}: {str(e).strip()}")
    admin.autocommit = True
    name = f"finetune_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def tracking_server(postgres_database, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = folder / "server.log"
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project's test extra installs psycopg2.
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{postgres_database}",
               "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("wb") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not become healthy:\n{log.read_text()[-4000:]}")
            time.sleep(0.3)
        yield url, folder / "artifacts"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn / job-runner children
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def command(step: str, small_squad) -> list[str]:
    train, validation = small_squad
    return [sys.executable, "-m", "finetune_mlflow", step, "--config", str(ROOT / "experiments" / "squad_local.yaml"),
            "--train_data", str(train), "--validation_data", str(validation), "--max_examples", "200",
            "--epochs", "1", "--set", "data.max_validation_examples=60"]


def test_main_then_four_parallel_tunes_on_postgres(tracking_server, small_squad, tmp_path, monkeypatch):
    url, artifacts = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}

    main = subprocess.run(command("main", small_squad), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert main.returncode == 0, main.stderr[-5000:]

    logs = [tmp_path / f"tune-{i}.log" for i in range(4)]
    tunes = []
    for log in logs:
        with log.open("wb") as handle:
            tunes.append(subprocess.Popen(command("tune", small_squad), env=env, cwd=tmp_path, stdout=handle,
                                          stderr=subprocess.STDOUT))
    codes = [process.wait(timeout=240) for process in tunes]
    assert codes == [0] * 4, "\n\n".join(log.read_text()[-3000:] for log, code in zip(logs, codes) if code)

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL)
    assert {r.info.status for r in runs} == {"FINISHED"}
    tune_runs = {r.info.run_id for r in runs if r.data.tags.get("finetune.step") == "tune"}
    assert len(tune_runs) == 5  # main's child + the four parallel ones

    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4, 5]  # no gap, no clash
    assert sorted(v.run_id for v in versions) == sorted(tune_runs)  # one version per tune run
    for v in versions:
        assert client.get_run(v.run_id).data.tags["finetune.registered_version"] == f"{MODEL_NAME}/{v.version}"
    # Artifacts went through the server into its destination, not into the clients' working directory.
    assert any(artifacts.rglob("MLmodel")) and not (tmp_path / "mlruns").exists()

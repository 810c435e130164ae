"""A team's deployment, end to end: `mlflow server` on a fresh PostgreSQL database with artifacts in an
S3-compatible bucket (moto's server on loopback), clients holding only the tracking URI.

`main` once, then two `tune` processes at the same time: every run finishes and the registry numbers the versions
without gaps or clashes, one per distinct model (the same settings train the same model, registered once). Then the local jobs folder is deleted and the champion is still loaded and served
from what the server holds; the bucket listing shows the artifacts went there, the tags and model metadata name
no folder of the machine that trained, each model ships only the code serving needs, and the clients left no
temp folders behind. Skipped (with the reason) only when no PostgreSQL is reachable on 127.0.0.1:5432.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from finetune_mlflow.model_code import PACKAGE_DIR, required_files
from tests import team_servers as team
from tests.conftest import ROOT

MODEL_NAME = "squad-qa-local"
QUESTION = {"question": ["Who signed the treaty?"], "context": ["In 911 Rollo signed the treaty with King Charles."]}


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 (the [server] extra) is needed for this test")
    pytest.importorskip("moto.server", reason="moto[server] (the [test] extra) is needed for this test")
    folder = tmp_path_factory.mktemp("team")
    with contextlib.ExitStack() as stack:
        try:
            database = stack.enter_context(team.fresh_database())
        except psycopg2.OperationalError as e:
            pytest.skip(f"no PostgreSQL reachable at {team.PG['host']}:{team.PG['port']} as {team.PG['user']}: "
                        f"{str(e).strip()}")
        endpoint = stack.enter_context(team.s3_store(folder))
        yield stack.enter_context(team.tracking_server(database, endpoint, folder)), endpoint


def command(step: str, small_squad) -> list[str]:
    train, validation = small_squad
    return [sys.executable, "-m", "finetune_mlflow", step, "--config", str(ROOT / "experiments" / "squad_local.yaml"),
            "--train_data", str(train), "--validation_data", str(validation), "--max_examples", "0",
            "--epochs", "2", "--poll_interval", "0.2",
            "--set", "evaluate.bootstrap_samples=200", "--set", "promotion.min_f1_gain=-10"]


def run_clients(small_squad, env: dict[str, str], folder: Path) -> None:
    main = subprocess.run(command("main", small_squad), env=env, cwd=folder, capture_output=True, text=True,
                          timeout=240)
    assert main.returncode == 0, main.stderr[-5000:]
    logs = [folder / f"tune-{i}.log" for i in range(2)]
    tunes = []
    for log in logs:
        with log.open("wb") as handle:
            tunes.append(subprocess.Popen(command("tune", small_squad), env=env, cwd=folder, stdout=handle,
                                          stderr=subprocess.STDOUT))
    codes = [process.wait(timeout=240) for process in tunes]
    assert codes == [0, 0], "\n\n".join(log.read_text()[-3000:] for log, code in zip(logs, codes) if code)


def check_registry(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL)
    assert {r.info.status for r in runs} == {"FINISHED"}
    tune_runs = {r.info.run_id for r in runs if r.data.tags.get("finetune.step") == "tune"}
    assert len(tune_runs) == 3  # main's child + the two parallel ones
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, len(versions) + 1))  # no gap, no clash
    assert len({v.tags["model_sha256"] for v in versions}) == len(versions)  # one version per distinct model
    assert {v.run_id for v in versions} <= tune_runs
    numbers = {f"{MODEL_NAME}/{v.version}" for v in versions}
    assert {client.get_run(r).data.tags["finetune.registered_version"] for r in tune_runs} == numbers
    for v in versions:
        assert v.tags["tuned_model"] == f"{v.tags['job_id']}/weights.npz"
    return runs


def serve(model_uri: str, env: dict[str, str], folder: Path) -> list[str]:
    """Answers of `mlflow models serve` (the scoring server a deployment runs) to QUESTION."""
    port = team.free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    body = json.dumps({"dataframe_split": {"columns": list(QUESTION), "data": [list(r) for r in
                                                                              zip(*QUESTION.values())]}})
    with team.background(command, env=env, log=folder / "serve.log", ready_url=f"http://127.0.0.1:{port}/ping"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return [row["answer"] for row in json.loads(response.read())["predictions"]]


def test_main_and_parallel_tunes_on_postgres_and_s3_then_serve_without_the_jobs_folder(
        team_server, small_squad, tmp_path, monkeypatch):
    url, endpoint = team_server
    home, scratch = tmp_path / "home", tmp_path / "client-tmp"
    scratch.mkdir()
    # PYTHONPATH: the clients run from their own folder but must import this checkout's code.
    env = team.client_env(url, FINETUNE_MLFLOW_HOME=str(home), TMPDIR=str(scratch), PYTHONPATH=str(ROOT))
    run_clients(small_squad, env, tmp_path)
    assert sorted(p.name for p in scratch.iterdir()) == []  # every download and staging folder was removed
    assert not (tmp_path / "mlruns").exists()  # artifacts went through the server, not into the clients' folder

    for name in [k for k in list(os.environ) if k.startswith(team.STORAGE_VARIABLES)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    client = MlflowClient()
    runs = check_registry(client)

    # Nothing a teammate reads names the training machine's jobs folder.
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    mlmodel = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion/MLmodel",
                                                       dst_path=str(tmp_path / "mlmodel"))).read_text()
    readable = [mlmodel, *(json.dumps(v.tags) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")),
                *(json.dumps({k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")}) for r in runs)]
    assert not [text for text in readable if str(home) in text or "local-jobs" in text]

    shutil.rmtree(home)  # the jobs folder is out of reach: serving must need only the server and its bucket
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    expected = model.predict(pd.DataFrame(QUESTION))["answer"].tolist()
    assert expected[0]
    assert serve(f"models:/{MODEL_NAME}@champion", env, tmp_path) == expected

    keys = team.bucket_keys(endpoint)
    logged_model = champion.source.rsplit("/", 1)[-1]  # models:/<model id>
    model_prefix = next(k for k in keys if k.endswith(f"/{logged_model}/artifacts/MLmodel"))[:-len("MLmodel")]
    shipped = sorted(k[len(model_prefix):] for k in keys if k.startswith(model_prefix))
    code = [k for k in shipped if k.startswith("code/")]
    assert len(code) == len(required_files(PACKAGE_DIR / "serving.py")) and not [k for k in code if "pycache" in k]
    assert "artifacts/weights.npz" in shipped
    assert sum(k.endswith("/prepared/train.jsonl") for k in keys) == 1  # one prepare run, reused by the tunes
    assert sum(k.endswith("/eval_results.json") for k in keys) == 4  # one base and three tuned evaluations
    assert sum("/tuned_model/localjob-" in k and k.endswith("/weights.npz") for k in keys) == 3

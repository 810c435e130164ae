"""Shared fixtures: every test gets its own tracking store and local-jobs home, and may not leak an active run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
SQUAD_TRAIN = ROOT / "data" / "squad" / "train.json"
SQUAD_VALIDATION = ROOT / "data" / "squad" / "validation.json"


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty SQLite tracking store, migrated once per test process: MLflow's schema migrations cost seconds per
    new database (in every process that opens it first), a file copy costs a millisecond."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_store(template: Path, folder: Path) -> Path:
    """A copy of the migrated template in `folder`, its Default experiment's artifacts under `folder/mlruns`."""
    path = folder / "mlflow.db"
    shutil.copyfile(template, path)
    default_artifacts_under(path, folder)
    return path


def default_artifacts_under(store: Path, folder: Path) -> None:
    """Where the store's Default experiment keeps artifacts: `folder/mlruns/0`, as MLflow would have chosen had the
    store been created with `folder` as the working directory."""
    with contextlib.closing(sqlite3.connect(store)) as connection, connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (str(folder / "mlruns" / "0"),))


def stop_leftover_processes(folder: Path) -> list[int]:
    """Kill what a test left running under its own folder (a detached trainer keeps going after its `tune` was
    killed, as a cloud job would; on 2 shared cores five of them cost the rest of the suite a core and a half)."""
    import psutil

    mine, killed = str(folder) + os.sep, []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and any(mine in part for part in process.info["cmdline"] or ()):
                process.kill()
                killed.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(killed, timeout=10)
    return [process.pid for process in killed]


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path, monkeypatch, store_template):
    """A per-test SQLite store (a copy of the migrated template) and jobs directory."""
    fresh_store(store_template, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FINETUNE_MLFLOW_HOME", str(tmp_path / "home"))
    # `mlflow run` executes `python -m finetune_mlflow ...`: make that the interpreter running the tests.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # Runs stay in the Default experiment unless a test opts in to the experiment its YAML names
    # (`delenv("MLFLOW_EXPERIMENT_NAME")`): MLflow's own choice wins over the YAML's.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "Default")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield
    stop_leftover_processes(tmp_path)
    leaked = mlflow.active_run()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    assert leaked is None, f"test leaked active run {leaked.info.run_id}"


def squad_subset(source: Path, articles: int, questions_per_article: int) -> dict:
    """The first few articles of a shipped SQuAD file, a few questions each: real data, test-sized."""
    document = json.loads(source.read_text(encoding="utf-8"))
    data = []
    for article in document["data"][:articles]:
        paragraphs, left = [], questions_per_article
        for paragraph in article["paragraphs"]:
            if left <= 0:
                break
            qas = paragraph["qas"][:left]
            left -= len(qas)
            paragraphs.append({"context": paragraph["context"], "qas": qas})
        data.append({"title": article["title"], "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


@pytest.fixture(scope="session")
def small_squad(tmp_path_factory) -> tuple[Path, Path]:
    """(train, validation) SQuAD v1.1 files: ~600 train and ~120 validation questions from the shipped data."""
    folder = tmp_path_factory.mktemp("squad")
    train, validation = folder / "train.json", folder / "validation.json"
    train.write_text(json.dumps(squad_subset(SQUAD_TRAIN, 12, 50)), encoding="utf-8")
    validation.write_text(json.dumps(squad_subset(SQUAD_VALIDATION, 4, 30)), encoding="utf-8")
    return train, validation


OPENAI_TEST_KEY = "sk-test-e2e0123456789abcdefghijklmnop"


@pytest.fixture
def openai_fake(monkeypatch, small_squad):
    """The fake OpenAI server behind OPENAI_BASE_URL, answering chat requests from the small validation set's gold
    answers (see `e2e_support.Answerer`); fails the test if the fake itself hit a bug."""
    from tests import e2e_support as e2e
    from tests.fakes.openai_server import FakeOpenAI

    with FakeOpenAI() as server:
        answerer = e2e.Answerer(e2e.gold_answers(small_squad[1]), checkpoint_step=server.checkpoint_step)
        server.chat_responder = e2e.openai_responder(answerer)
        server.answerer = answerer
        e2e.use_project_python(monkeypatch)
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_TEST_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        for var in ("OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
            monkeypatch.delenv(var, raising=False)
        yield server
        assert server.handler_errors == []

"""Inputs that used to end in a traceback end in one `error:` line and exit 2, with no run left RUNNING (and, where
the input is checked first, no run at all): model references that name nothing, data URIs that cannot be
downloaded, tracking stores that cannot be used or do not answer (in bounded time), small but hostile YAML, and a
report over absurd metrics and hostile run names. Through the real command line (`finetune_mlflow.cli.main`)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.store_check import TIMEOUT_ENV
from tests.test_bad_input import CONFIG, VALID, all_runs, cli, error_line


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def no_run_running() -> None:
    assert [r.info.run_id for r in all_runs() if r.info.status == "RUNNING"] == []


REFERENCES = [
    ("models:/nope/1", "Model Version (name=nope, version=1) not found"),
    ("models:/nope/99", "not found"),
    ("models:/squad-qa-local@ghost", "not found"),
    ("models:/", "expected models:/<name>/<version>"),
    ("models:/onlyname", "expected models:/<name>/<version>"),
    ("runs:/", "no run id after runs:/"),
    ("runs:/not-a-run", "Run with id=not-a-run not found"),
    ("runs:/PLAIN_RUN", "cannot be resolved"),  # a run that exists but logged no model (a prepare run)
    ("/etc/passwd", "is neither 'span-ranker-base'"),
    ("../../outside/weights.npz", "is neither 'span-ranker-base'"),
    ("localjob-000000000000/weights.npz", "has no weights under the local jobs home"),
]


def test_a_model_reference_that_names_nothing_is_one_line_before_any_run(capsys):
    client = MlflowClient()  # one store for every case: each case is checked before a run could open
    plain = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    client.set_terminated(plain)
    before = {r.info.run_id for r in all_runs()}
    for reference, expected in REFERENCES:
        reference = reference.replace("PLAIN_RUN", plain)
        code, err = cli(capsys, "evaluate", "--config", CONFIG, "--model", reference, "--validation_data", VALID)
        assert code == 2 and "Traceback" not in err, (reference, err[-3000:])
        assert expected in error_line(err), reference
        assert {r.info.run_id for r in all_runs()} == before, reference  # refused before a run was opened


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word (a database behind a dead proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


DATA_URIS = [
    ("http://127.0.0.1:{closed}/squad.json", "cannot download"),
    ("ftp://127.0.0.1:{closed}/squad.json", "ConnectionRefusedError"),
    ("s3://no-such-bucket-finetune/squad.json", "cannot download"),
    ("nosuch://host/squad.json", "Could not find a registered artifact repository"),
    ("runs:/not-a-run/prepared/train.jsonl", "cannot download"),
]


def test_a_train_data_uri_that_cannot_be_downloaded_is_one_line(capsys, monkeypatch, closed_port):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no wait on an instance-metadata endpoint
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    for uri, expected in DATA_URIS:
        uri = uri.format(closed=closed_port)
        code, err = cli(capsys, "prepare", "--config", CONFIG, "--train_data", uri, "--validation_data", VALID)
        assert code == 2 and "Traceback" not in err, (uri, err[-3000:])
        line = error_line(err)
        assert line.startswith(f"error: {uri}: cannot download") and expected in line, line
        no_run_running()


@pytest.mark.parametrize("uri,expected", [
    ("foo://bar", "cannot be used: Model registry functionality is unavailable"),
    ("file://", "cannot be used"),
    ("http://127.0.0.1:{closed}", "is unreachable ([Errno 111] Connection refused, 3 tries)"),
    ("postgresql+psycopg2://finetune:hunter2secret@127.0.0.1:{closed}/mlflow", "is unreachable"),
    ("postgresql+psycopg2://finetune:hunter2secret@127.0.0.1:{silent}/mlflow", "did not answer within 4 s"),
])
def test_a_tracking_store_that_cannot_be_used_is_one_line_in_bounded_time(capsys, monkeypatch, closed_port,
                                                                          silent_port, uri, expected):
    uri = uri.format(closed=closed_port, silent=silent_port)
    monkeypatch.setenv(TIMEOUT_ENV, "4")
    mlflow.set_tracking_uri(uri)
    started = time.monotonic()
    code, err = cli(capsys, "prepare", "--config", CONFIG, "--validation_data", VALID)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = error_line(err)
    assert expected in line and "hunter2secret" not in err, line
    assert time.monotonic() - started < 60


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


HOSTILE_YAML = [
    ("deep_list", "tune: " + "[" * 30_000 + "]" * 30_000 + "\n", ":1: not valid YAML (nested deeper than 32"),
    ("deep_map", "tune:\n  epochs: " + "{a: " * 30_000 + "1" + "}" * 30_000 + "\n", ":2: not valid YAML (nested"),
    ("long_int", "tune:\n  epochs: " + "9" * 5_000 + "\n", ":2: not valid YAML (a number of 5,000 characters"),
    ("long_negative", "tune:\n  learning_rate: -" + "7" * 5_000 + "\n", ":2: not valid YAML (a number of 5,001"),
    ("huge_experiment", "experiment: " + "x" * 999_000 + "\n", "expected at most 1000 characters (got 999,000)"),
    ("long_experiment", "experiment: " + "e" * 600 + "\n", "experiment name has 600 characters; MLflow allows"),
    ("long_base_model", "tune:\n  base_model: " + "m" * 5_000 + "\n", "tune.base_model is 'mmm"),
]


def test_small_hostile_yaml_is_one_short_line_before_any_run(capsys, tmp_path):
    for name, text, expected in HOSTILE_YAML:
        code, err = cli(capsys, "prepare", "--config", write(tmp_path, f"{name}.yaml", text), "--validation_data",
                        VALID)
        assert code == 2 and "Traceback" not in err, (name, err[-3000:])
        line = error_line(err)
        assert expected in line and len(line) < 600, line[:600]
    code, err = cli(capsys, "prepare", "--config", CONFIG, "--epochs", "9" * 5_000)  # the same as a parameter
    assert code == 2 and len(error_line(err)) < 600
    assert all_runs() == []


def test_report_over_an_absurd_latency_and_hostile_run_names_is_drawn_escaped(capsys, tmp_path):
    names = {"newline": "first line\n| injected | row |", "script": "<script>alert(1)</script>",
             "link": "[click](javascript:alert(1))"}
    ids = []
    for key, name in names.items():
        with mlflow.start_run(run_name=name, tags={"finetune.step": "tune", "finetune.provider": "local"}) as run:
            mlflow.log_metrics({"eval_f1": 50.0 + len(ids), "eval_exact_match": 40.0,
                                "latency_ms_p95": 1e308 if key == "script" else 12.0})
            ids.append(run.info.run_id)
    code = cli(capsys, "report", "--runs", ",".join(ids), "--out", tmp_path / "report")[0]
    assert code == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown
    assert "[click](javascript" not in markdown and "[click]\\(javascript" in markdown
    table = markdown.split("## Runs, best first")[1].split("##")[0].strip().splitlines()
    assert len(table) == 2 + len(names), table  # header, rule, one line per run: the newline split nothing
    assert all(line.count(" | ") == table[0].count(" | ") for line in table), table
    assert "1e+308" in markdown and "F1 against latency: Not drawn: the values cannot be plotted" in markdown
    assert "<script>" not in (tmp_path / "report" / "report.html").read_text()

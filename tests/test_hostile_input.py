"""Hostile input, round two, through the real command line (`cli.main`): each class is one `error: file:line:
reason` line, exit status 2, no run left RUNNING, no job launched. The files are generated here (a symlink loop, a
200,000-deep nest and a lone surrogate do not belong in a checked-in corpus).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.test_bad_input import BAD, CONFIG, VALID, all_runs, cli, error_line, prepare

OK_ROW = {"id": "q1", "question": "Which city?", "context": "Warsaw is the capital.", "answers": ["Warsaw"]}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def no_run_left_running() -> None:
    assert [r.info.run_id for r in all_runs() if r.info.status != "FAILED"] == []


def no_job_launched() -> None:
    assert not (Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs").exists()


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("\n".join([json.dumps(OK_ROW), *lines]) + "\n", encoding="utf-8")
    return path


def squad(path: Path, *answer_starts: object) -> Path:
    qas = [{"id": f"q{n}", "question": f"Which city {n}?", "answers": [{"text": "Warsaw", "answer_start": start}]}
           for n, start in enumerate(answer_starts, start=1)]
    document = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "Warsaw is the capital.", "qas": qas}]}]}
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


def symlink_loop(path: Path) -> Path:
    os.symlink(path.name, path)
    return path


def data_cases(tmp: Path) -> list[tuple[str, Path, int | None, str]]:
    return [
        ("lone-surrogate", jsonl(tmp / "s.jsonl", '{"id": "q2", "question": "\\ud800?", "context": "Warsaw", '
                                 '"answers": ["Warsaw"]}'), 2, r"lone UTF-16 surrogate \(\\ud800\)"),
        ("deep-nest-jsonl", jsonl(tmp / "d.jsonl", "[" * 200_000 + "]" * 200_000), 2, r"nested too deeply"),
        ("deep-nest-json", _write(tmp / "d.json", '{"version": "1.1", "data": ' + "[" * 200_000 + "]" * 200_000
                                  + "}"), None, r"nested too deeply"),
        ("symlink-loop", symlink_loop(tmp / "loop.jsonl"), None, r"is a symbolic link loop"),
        ("csv-field-over-128k", _write(tmp / "big.csv", "id,question,context,answers\nq1,Which?,"
                                       + "Warsaw " * 20_000 + ",Warsaw\n"), 2, r"field larger than field limit"),
        ("answer-start-negative", squad(tmp / "neg.json", -5), 11, r"answer_start -5 is outside the context"),
        ("answer-start-past-end", squad(tmp / "far.json", 99999), 11, r"answer_start 99999 is outside the context"),
        ("answer-start-not-int", squad(tmp / "abc.json", "abc"), 11, r"answer_start 'abc' is not an integer"),
    ]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_hostile_data_is_one_line_and_exit_two(capsys, tmp_path):
    """All cases share one tracking store (creating a SQLite store is most of a case's cost)."""
    for name, path, line, reason in data_cases(tmp_path):
        code, stderr = prepare(capsys, path)
        assert code == 2, (name, stderr[-2000:])
        message = error_line(stderr)
        where = f"{path}:{line}: " if line is not None else f"{path}: "
        assert message.startswith(f"error: {where}"), (name, message[:300])
        assert re.search(reason, message), (name, message[:300])
        assert "Traceback" not in stderr and len(message) < 400, name
    no_run_left_running()


def test_answer_start_out_of_range_is_dropped_and_counted_under_on_invalid_drop(capsys, tmp_path):
    path = squad(tmp_path / "mixed.json", 0, -5, "abc")
    code, stderr = cli(capsys, "prepare", "--config", CONFIG, "--train_data", path, "--validation_data", VALID,
                       "--on_invalid", "drop")
    assert code == 0, stderr
    (run,) = all_runs()
    assert run.data.metrics["n_invalid_dropped"] == 2 and run.data.metrics["n_train"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode bits; run as a normal user")
def test_unreadable_file(capsys, tmp_path):
    path = jsonl(tmp_path / "secret.jsonl")
    path.chmod(0)
    code, stderr = prepare(capsys, path)
    assert code == 2
    assert error_line(stderr) == f"error: {path}: cannot be read: permission denied"
    no_run_left_running()


ALIAS_BOMB = "a: &a {x: 1, y: 1}\nb: &b {a: *a, b: *a}\nc: &c {a: *b, b: *b}\nd: {a: *c, b: *c}\n"


@pytest.mark.parametrize(("text", "line", "reason"), [
    (ALIAS_BOMB, 2, r"aliases \(\*name\) are not allowed"),
    ("tune:\n  epochs: 2\n  epochs: 3\n", 3, r"duplicate key 'epochs'"),
], ids=["alias-bomb", "duplicate-key"])
def test_hostile_yaml_is_refused_before_any_run(capsys, tmp_path, text, line, reason):
    path = _write(tmp_path / "experiment.yaml", text)
    code, stderr = cli(capsys, "tune", "--config", path)
    assert code == 2
    message = error_line(stderr)
    assert message.startswith(f"error: {path}:{line}: ") and re.search(reason, message), message
    assert all_runs() == []
    no_job_launched()


def test_config_path_that_is_a_directory(capsys, tmp_path):
    code, stderr = cli(capsys, "tune", "--config", tmp_path)
    assert code == 2
    assert error_line(stderr).startswith(f"error: {tmp_path}: ") and "directory" in error_line(stderr)
    assert all_runs() == []


def test_abbreviated_parameter_is_refused(capsys):
    """`mlflow run -P epoch=1` appends `--epoch 1`: argparse must not take it for `--epochs`."""
    with pytest.raises(SystemExit) as exited:
        cli(capsys, "tune", "--config", CONFIG, "--epoch", "1")
    assert exited.value.code == 2
    assert "unrecognized arguments: --epoch 1" in capsys.readouterr().err
    assert all_runs() == []


KNOB_CASES = [("learning_rate", "inf", "a finite number"), ("learning_rate", "nan", "a finite number"),
              ("poll_interval", "inf", "a finite number"), ("max_validation_examples", "-1", ">= 0"),
              ("epochs", "1000000000", "<= 100"), ("registered_model_name", "../../x", "no slashes")]


def test_unusable_knob_stops_main_before_any_run_or_job(capsys):
    for flag, value, expected in KNOB_CASES:
        code, stderr = cli(capsys, "main", "--config", CONFIG, "--train_data", VALID, "--validation_data", VALID,
                           f"--{flag}", value)
        assert code == 2, flag
        message = error_line(stderr)
        assert message.startswith(f"error: parameter {flag}: ") and expected in message, message
    assert all_runs() == []
    no_job_launched()



def test_sync_refuses_job_ids_that_are_paths_before_reading_anything(capsys, tmp_path):
    planted = Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "planted"
    planted.mkdir(parents=True)
    (planted / "status.json").write_text(json.dumps({"state": "succeeded", "tuned_model": "/etc/passwd"}))
    for job_id in ("../planted", "../../../etc", "localjob-0123456789ab/../../planted", "/etc/passwd"):
        code, stderr = cli(capsys, "sync", "--config", CONFIG, "--job_id", job_id, "--train_data", VALID,
                           "--validation_data", VALID)
        assert code == 2
        assert error_line(stderr) == (f"error: local job id {job_id!r} is not a local job id (expected localjob- "
                                      "and 12 hex digits); nothing was read or requested")
    no_run_left_running()
    assert MlflowClient().search_registered_models() == []

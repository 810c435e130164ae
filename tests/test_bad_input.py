"""Bad input through the real command line: every broken file or config is one clear error naming the file, the
line (when there is one) and the reason; exit status 2; no run left RUNNING; nothing registered.

The corpus lives in tests/data/bad/ (small, byte-exact: see its .gitattributes); the 5 MB example is generated.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import ExecutionException
from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main
from tests.conftest import ROOT

BAD = Path(__file__).resolve().parent / "data" / "bad"
VALID = BAD / "valid.jsonl"
CONFIG = ROOT / "experiments" / "squad_local.yaml"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """cwd = tmp_path, so the SQLite store's default artifact root (./mlruns) lands there, not in the checkout."""
    monkeypatch.chdir(tmp_path)


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def prepare(capsys, train: Path, *extra: str) -> tuple[int, str]:
    return cli(capsys, "prepare", "--config", CONFIG, "--train_data", train, "--validation_data", VALID, *extra)


def all_runs() -> list[mlflow.entities.Run]:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.ALL) if experiments else []


def assert_failed_cleanly(*, runs_expected: bool) -> None:
    """Every run FAILED (none RUNNING or FINISHED) or, for errors before any run opens, no run at all; no model."""
    runs = all_runs()
    if runs_expected:
        assert runs, "the step should have opened (and failed) a run"
    else:
        assert runs == [], "a config error must fail before any run is opened"
    assert {r.info.status for r in runs} <= {"FAILED"}, [(r.info.run_id, r.info.status) for r in runs]
    assert MlflowClient().search_registered_models() == []


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


DATA_CASES = [
    ("truncated.json", 21, r"malformed JSON \(Expecting property name"),
    ("array.json", 1, r"expected a SQuAD v1\.1 object .* got list"),
    ("array_line.jsonl", 3, r"expected a JSON object per line, got list"),
    ("broken_line.jsonl", 3, r"malformed JSON \(Unterminated string"),
    ("wrong_types.jsonl", 2, r"field 'question' must be a string, got int"),
    ("wrong_types.json", 21, r"data\[0\]\.paragraphs\[0\]\.qas\[1\] must have 'id' and a 'question' string"),
    ("wrong_answer_type.jsonl", 3, r"answers must be a non-empty list .* got 7"),
    ("missing_answers.jsonl", 2, r"missing field 'answers'"),
    ("missing_answers.json", 21, r"qas\[1\]: answers must be a non-empty list .* got None"),
    ("answer_not_in_context.jsonl", 2, r"answer 'King Kazimierz' does not occur in the context.*on_invalid: drop"),
    ("empty_strings.jsonl", 2, r"empty question \(id 'q2'\)"),
    ("empty_answer.jsonl", 3, r"empty answer \(id 'q3'\)"),
    ("invalid_utf8.jsonl", 3, r"not valid UTF-8 \(byte 0xe9 at offset \d+\)"),
    ("duplicate_ids.jsonl", 2, r"id 'q1' appears again with different content \(first at line 1\)"),
    ("empty.jsonl", None, r"file is empty"),
]


@pytest.mark.parametrize(("name", "line", "reason"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_one_clear_error_and_a_failed_run(capsys, name, line, reason):
    code, stderr = prepare(capsys, BAD / name)
    assert code == 2
    message = error_line(stderr)
    where = f"{BAD / name}:{line}: " if line is not None else f"{BAD / name}: "
    assert message.startswith(f"error: {where}"), message
    assert re.search(reason, message), message
    assert "Traceback" not in stderr
    assert_failed_cleanly(runs_expected=True)


def big_example(path: Path, valid_rows: int = 0) -> Path:
    """One ~5 MB example (over data.max_example_chars=20000) on line valid_rows + 1 of a JSONL file."""
    context = "Warsaw is the capital of Poland. " + "filler text " * (5 * 1024 * 1024 // 12)
    rows = VALID.read_text(encoding="utf-8").splitlines()[:valid_rows]
    rows.append(json.dumps({"id": "huge", "question": "What is the capital of Poland?", "context": context,
                            "answers": ["Warsaw"]}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert path.stat().st_size > 5_000_000
    return path


def test_five_megabyte_example_is_refused_by_size(capsys, tmp_path):
    path = big_example(tmp_path / "huge.jsonl")
    code, stderr = prepare(capsys, path)
    assert code == 2
    message = error_line(stderr)
    assert message.startswith(f"error: {path}:1: example is "), message[:300]
    assert "over data.max_example_chars=20000" in message and len(message) < 1000  # no 5 MB echo
    assert_failed_cleanly(runs_expected=True)


@pytest.mark.parametrize("name", ["bom.jsonl", "crlf.jsonl"])
def test_bom_and_crlf_are_accepted(capsys, name):
    raw = (BAD / name).read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") or b"\r\n" in raw  # the fixture really is what it claims
    code, stderr = prepare(capsys, BAD / name)
    assert code == 0, stderr
    (run,) = all_runs()
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_train"] == 4 and run.data.metrics["n_invalid_dropped"] == 0
    rows = [json.loads(line) for line in Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="prepared/train.jsonl")).read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4"]
    assert not any("\ufeff" in r["id"] or "\r" in r["context"] for r in rows)


def test_on_invalid_drop_keeps_valid_rows_and_accounts_for_the_drops(capsys, caplog, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((BAD / "mixed_invalid.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    huge = big_example(tmp_path / "huge.jsonl")
    # Both inputs carry bad rows: 2 in train (answer not in context, empty question), the huge one in validation.
    code, stderr = cli(capsys, "prepare", "--config", CONFIG, "--train_data", mixed, "--validation_data", VALID,
                       "--on_invalid", "drop")
    assert code == 0, stderr
    (run,) = all_runs()
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_invalid_dropped"] == 2
    assert run.data.metrics["n_train"] == 4 and run.data.metrics["n_raw"] == 6 + 4
    dropped_file = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="prepared/dropped.jsonl")
    dropped = [json.loads(line) for line in Path(dropped_file).read_text(encoding="utf-8").splitlines()]
    assert [(d["file"], d["line"], d["id"]) for d in dropped] == [(str(mixed), 2, "q5"), (str(mixed), 4, "q6")]
    assert "does not occur in the context" in dropped[0]["reason"] and dropped[1]["reason"] == "empty question"
    assert f"{mixed}: dropped 0 duplicate and 2 invalid rows" in caplog.text  # the warning counts them

    code, stderr = cli(capsys, "prepare", "--config", CONFIG, "--train_data", mixed, "--validation_data", huge,
                       "--on_invalid", "drop")
    # Validation is left empty once its only row is dropped: a clear error, not an empty split.
    assert code == 2
    assert re.search(r"after cleaning, train has 4 and validation 0 examples", error_line(stderr))


CONFIG_CASES = [
    ("unknown_key.yaml", 3, r"tune: unknown key 'epoch'; expected one of: .*epochs"),
    ("wrong_type.yaml", 3, r"tune\.epochs: expected int, got 'three'"),
    ("negative_epochs.yaml", 3, r"tune\.epochs is -1; expected >= 1 and <= 100"),
    ("bad_syntax.yaml", 4, r"not valid YAML \(expected ',' or '\]'"),
    ("unknown_provider.yaml", 2, r"tune\.provider: unknown provider 'huggingface'; expected one of local, openai, vertex"),
]


@pytest.mark.parametrize(("name", "line", "reason"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_tune_config_fails_before_any_run(capsys, name, line, reason):
    code, stderr = cli(capsys, "tune", "--config", BAD / name, "--train_data", VALID, "--validation_data", VALID)
    assert code == 2
    message = error_line(stderr)
    assert message.startswith(f"error: {BAD / name}:{line}: "), message
    assert re.search(reason, message), message
    assert_failed_cleanly(runs_expected=False)


def test_bad_parameter_names_the_parameter(capsys):
    code, stderr = cli(capsys, "tune", "--config", CONFIG, "--epochs", "-2")
    assert code == 2
    assert error_line(stderr) == "error: parameter epochs: tune.epochs is -2; expected >= 1 and <= 100"
    assert_failed_cleanly(runs_expected=False)


def test_bad_data_inside_tune_fails_the_tune_run_and_its_prepare_child(capsys):
    code, stderr = cli(capsys, "tune", "--config", CONFIG, "--train_data", BAD / "broken_line.jsonl",
                       "--validation_data", VALID, "--epochs", "1")
    assert code == 2
    assert error_line(stderr).startswith(f"error: {BAD / 'broken_line.jsonl'}:3: malformed JSON")
    runs = all_runs()
    assert sorted(r.data.tags["finetune.step"] for r in runs) == ["prepare", "tune"]
    assert_failed_cleanly(runs_expected=True)
    assert not (Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs").exists()  # no job was launched


def test_subprocess_exit_status_is_two():
    result = subprocess.run(
        [sys.executable, "-m", "finetune_mlflow", "prepare", "--config", str(CONFIG),
         "--train_data", str(BAD / "invalid_utf8.jsonl"), "--validation_data", str(VALID)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"error: {BAD / 'invalid_utf8.jsonl'}:3: not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert_failed_cleanly(runs_expected=True)


@pytest.fixture
def python_on_path(tmp_path, monkeypatch):
    """MLproject commands call `python`: make it this interpreter (CI may only have `python3`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.parametrize(("entry_point", "parameters"), [
    ("prepare", {"train_data": str(BAD / "broken_line.jsonl"), "validation_data": str(VALID)}),
    ("tune", {"config": str(BAD / "unknown_provider.yaml"), "train_data": str(VALID), "validation_data": str(VALID)}),
], ids=["data-error-in-step", "config-error-before-step"])
def test_mlflow_run_marks_its_run_failed(python_on_path, entry_point, parameters):
    with pytest.raises(ExecutionException):
        mlflow.projects.run(str(ROOT), entry_point=entry_point, parameters=parameters, env_manager="local",
                            synchronous=True)
    # MLflow created the run before the command started; the non-zero exit ended it FAILED.
    runs = all_runs()
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert_failed_cleanly(runs_expected=True)

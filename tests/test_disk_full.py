"""A full disk, for real: a 3 MB tmpfs (skipped where mounting is not permitted) holding the artifacts, then the
tracking store too. One line naming the full path, exit 2; every run FAILED when the store can still be written,
and when it cannot (the store is on the full device) the line names the runs it could not end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT, default_artifacts_under
from tests.test_bad_input import CONFIG, VALID, all_runs, cli, error_line

BIG_INPUT = ROOT / "data" / "squad" / "validation.json"  # 600 KB: its prepared copies overflow 3 MB


@pytest.fixture
def full_disk(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def prepare_big(capsys) -> tuple[int, str]:
    return cli(capsys, "prepare", "--config", CONFIG, "--train_data", BIG_INPUT, "--validation_data", VALID)


def test_artifacts_on_a_full_disk_one_line_and_the_run_failed(full_disk, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(full_disk)  # the SQLite store (on the big disk) puts artifacts under ./mlruns
    default_artifacts_under(tmp_path / "mlflow.db", full_disk)
    code, stderr = prepare_big(capsys)
    assert code == 2
    message = error_line(stderr)
    assert message.startswith(f"error: no space left on {full_disk}/mlruns/"), message
    assert "could not be marked" not in message and "Traceback" not in stderr
    runs = all_runs()
    assert runs and {r.info.status for r in runs} == {"FAILED"}
    assert "No space left on device" in runs[0].data.tags["finetune.end_reason"]


def test_store_on_the_full_disk_names_the_runs_it_could_not_end(full_disk, capsys, monkeypatch):
    monkeypatch.chdir(full_disk)
    uri = f"sqlite:///{full_disk / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    code, stderr = prepare_big(capsys)
    assert code == 2
    message = error_line(stderr)
    assert message.startswith(f"error: no space left on {full_disk}/"), message
    stuck = [r.info.run_id for r in all_runs() if r.info.status == "RUNNING"]
    # Ended when the store could still take the write; otherwise named in the message, which says what to do.
    assert all(run_id in message for run_id in stuck), (stuck, message)
    assert "Traceback" not in stderr and len(stderr.splitlines()) < 12

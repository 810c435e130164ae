"""`cancel` never signals a process it cannot prove is the job's trainer: real trainers, real unrelated processes
standing where a reused pid would put them, and the real `cancel` entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_mlflow.cli import main
from finetune_mlflow.config import load_config
from finetune_mlflow.liveness import identity, pid_alive
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import JobState
from tests.test_crash_local import CONFIG
from tests.test_local_provider import prepared, request, wait, wait_for_file  # noqa: F401 - fixture

SLEEPER = "import time; time.sleep(120)"


@pytest.fixture
def bystanders():
    """Unrelated processes a test starts (a reused pid's new owner); all stopped at the end."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", SLEEPER, *args], start_new_session=True)  # a group leader
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def cancel(capsys, job_id: str) -> tuple[int, str]:
    code = main(["cancel", "--config", str(CONFIG), "--job_id", job_id])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def running_alone(process: subprocess.Popen) -> bool:
    return process.poll() is None and pid_alive(process.pid)


def test_cancel_of_a_finished_job_signals_nothing_even_a_perfect_impostor(prepared, bystanders, capsys):
    provider = get_provider("local", load_config(None))
    job = wait(provider, provider.start_job(request(prepared, epochs=1)).job_id)
    assert job.state is JobState.SUCCEEDED
    job_dir = provider.jobs_dir / job.job_id
    # The pid now belongs to a process that even carries the job's folder in its arguments.
    impostor = bystanders(str(job_dir))
    (job_dir / "pid.json").write_text(json.dumps(identity(impostor.pid)))
    (job_dir / "launch.json").write_text(json.dumps({"pid": impostor.pid}))
    code, output = cancel(capsys, job.job_id)
    assert code == 0 and f"{job.job_id}: succeeded" in output, output
    assert running_alone(impostor)
    assert provider.get_job(job.job_id).state is JobState.SUCCEEDED


@pytest.mark.parametrize("impostor_args", ["job folder in its arguments", "no job folder"])
def test_cancel_of_a_running_job_whose_trainer_pid_was_reused_signals_nobody(prepared, bystanders, capsys,
                                                                                impostor_args):
    provider = get_provider("local", load_config(None))
    job = provider.start_job(request(prepared, epochs=100))
    job_dir = provider.jobs_dir / job.job_id
    recorded = json.loads(wait_for_file(job_dir / "pid.json").read_text())
    assert recorded["started"] and str(job_dir) in recorded["cmdline"]
    os.kill(recorded["pid"], signal.SIGKILL)
    while pid_alive(recorded["pid"]):
        time.sleep(0.02)
    impostor = bystanders(*([str(job_dir)] if impostor_args.startswith("job") else []))
    # What a reused pid looks like: the number the trainer had, now some other process (another start time).
    for name in ("pid.json", "launch.json"):
        (job_dir / name).write_text(json.dumps({**recorded, "pid": impostor.pid}))
    code, output = cancel(capsys, job.job_id)
    assert code == 0 and f"{job.job_id}: cancelled" in output, output
    assert running_alone(impostor)
    assert provider.get_job(job.job_id).state is JobState.CANCELLED


def test_a_pid_file_of_an_older_release_without_start_time_is_still_checked_by_command_line(prepared, bystanders,
                                                                                           capsys):
    provider = get_provider("local", load_config(None))
    job = provider.start_job(request(prepared, epochs=100))
    job_dir = provider.jobs_dir / job.job_id
    trainer = json.loads(wait_for_file(job_dir / "pid.json").read_text())["pid"]
    stranger = bystanders()
    (job_dir / "launch.json").write_text(json.dumps({"pid": stranger.pid}))
    (job_dir / "pid.json").write_text(json.dumps({"pid": trainer}))  # the old format: a pid and nothing else
    code, output = cancel(capsys, job.job_id)
    assert code == 0 and f"{job.job_id}: cancelled" in output, output
    deadline = time.monotonic() + 30
    while pid_alive(trainer):  # the real trainer (its folder in its arguments) did get SIGTERM
        assert time.monotonic() < deadline, "the job's own trainer was not stopped"
        time.sleep(0.02)
    assert running_alone(stranger)

"""The local provider behaves like a cloud service: background job, cursor-paged events, adoption on retry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_mlflow.config import load_config
from finetune_mlflow.errors import ConfigError, ProviderError
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, Provider, TuningRequest
from finetune_mlflow.providers.local.provider import MAX_RESTARTS
from finetune_mlflow.preparation import build_splits, write_prepared


@pytest.fixture
def prepared(small_squad, tmp_path) -> Path:
    train, validation = small_squad
    config = load_config(None, {"train_data": str(train), "validation_data": str(validation), "max_examples": "150"})
    train_rows, validation_rows, _, dropped = build_splits(config)
    write_prepared(tmp_path / "prepared", train_rows, validation_rows, dropped)
    return tmp_path / "prepared"


def request(prepared: Path, run_id: str = "run-1", epochs: int = 2) -> TuningRequest:
    return TuningRequest(run_id=run_id, base_model="span-ranker-base", prepared_dir=prepared, epochs=epochs,
                         learning_rate=0.01, batch_size=16, seed=0, suffix="t")


def wait(provider, job_id: str, deadline_s: float = 60.0):
    deadline = time.monotonic() + deadline_s
    while (job := provider.get_job(job_id)).state not in TERMINAL_STATES:
        assert time.monotonic() < deadline, "local job did not finish"
        time.sleep(0.05)
    return job


def test_job_runs_in_the_background_and_pages_events_with_a_cursor(prepared):
    provider = get_provider("local", load_config(None))
    assert isinstance(provider, Provider)
    assert provider.preflight(request(prepared)).n_train == 150
    job = provider.start_job(request(prepared))
    assert job.job_id.startswith("localjob-")
    points, cursor = [], None
    deadline = time.monotonic() + 60
    while True:
        state = provider.get_job(job.job_id).state
        page = provider.read_metrics(job.job_id, cursor)
        points += page.points
        cursor = page.next_cursor
        if state in TERMINAL_STATES:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    final = provider.get_job(job.job_id)
    assert final.state is JobState.SUCCEEDED and Path(final.tuned_model).exists()
    train_steps = [p.step for p in points if p.key == "train_loss"]
    assert train_steps == list(range(1, len(train_steps) + 1))  # every step once, in order
    assert provider.read_metrics(job.job_id, cursor).points == []  # nothing is read twice
    assert len(provider.read_metrics(job.job_id, None).points) == len(points)
    assert final.metrics["completed_step_count"] == len(train_steps)
    assert list(provider.list_jobs()) == [job.job_id]
    prediction = provider.predict(final.tuned_model, "Who?", "Ada Lovelace wrote the notes.")
    assert prediction.text and prediction.latency_ms >= 0


def test_starting_twice_for_one_run_adopts_the_first_job(prepared):
    provider = get_provider("local", load_config(None))
    first = provider.start_job(request(prepared, epochs=1))
    second = provider.start_job(request(prepared, epochs=1))
    assert second.job_id == first.job_id and len(list(provider.list_jobs())) == 1
    wait(provider, first.job_id)


def test_a_killed_trainer_is_restarted_then_a_trainer_that_keeps_dying_is_a_failed_job(prepared):
    provider = get_provider("local", load_config(None))
    job = provider.start_job(request(prepared, epochs=100))
    pid_file = provider.jobs_dir / job.job_id / "pid.json"
    killed: set[int] = set()
    deadline = time.monotonic() + 120
    while True:
        current = provider.get_job(job.job_id)  # notices a dead trainer: restarts it, or gives up
        if current.state is JobState.FAILED:
            break
        pid = json.loads(pid_file.read_text())["pid"] if pid_file.exists() else None
        if pid is not None and pid not in killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        assert time.monotonic() < deadline, "the job neither restarted nor failed"
        time.sleep(0.02)
    assert current.error_code == "trainer_died" and len(killed) == MAX_RESTARTS + 1
    assert json.loads((provider.jobs_dir / job.job_id / "restarts.json").read_text()) == {"count": MAX_RESTARTS}


def wait_for_file(path: Path, seconds: float = 30.0) -> Path:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path


def test_a_redundant_trainer_launch_leaves_the_running_job_alone(prepared):
    """A crash right after launching a trainer makes the rerun launch again: the second trainer must bow out."""
    provider = get_provider("local", load_config(None))
    job = provider.start_job(request(prepared, epochs=3))
    job_dir = provider.jobs_dir / job.job_id
    first = json.loads(wait_for_file(job_dir / "pid.json").read_text())["pid"]
    second = subprocess.run([sys.executable, "-m", "finetune_mlflow.providers.local.trainer", str(job_dir)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "another trainer holds this job" in second.stderr
    final = wait(provider, job.job_id)
    assert final.state is JobState.SUCCEEDED
    assert json.loads((job_dir / "pid.json").read_text())["pid"] == first
    steps = [p.step for p in provider.read_metrics(job.job_id, None).points if p.key == "train_loss"]
    assert steps == sorted(set(steps))


def test_unknown_models_and_jobs_are_clear_errors(prepared):
    provider = get_provider("local", load_config(None))
    with pytest.raises(ConfigError, match="base_model 'gpt-4' is unknown"):
        provider.preflight(TuningRequest("r", "gpt-4", prepared, 1, 0.1, 0, 0, "s"))
    with pytest.raises(ProviderError, match="job localjob-nope not found"):
        provider.get_job("localjob-nope")
    with pytest.raises(ConfigError, match="neither"):
        provider.predict("/no/such/weights.npz", "q", "c")
    with pytest.raises(ConfigError, match="unknown provider 'azure'"):
        get_provider("azure", load_config(None))

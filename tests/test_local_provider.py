"""The local provider behaves like a cloud service: background job, cursor-paged events, adoption on retry."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune_mlflow.config import load_config
from finetune_mlflow.errors import ConfigError, ProviderError
from finetune_mlflow.providers.local.passage_cache import BoundedCache
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, Provider, TuningRequest
from finetune_mlflow.providers.job_dir import restart_times
from finetune_mlflow.providers.local.provider import LocalProvider
from finetune_mlflow.preparation import write_splits
from finetune_mlflow.providers.local.provider import weights_file
from tests.waiting import job_progress, run_watched, until


@pytest.fixture
def prepared(small_squad, tmp_path) -> Path:
    train, validation = small_squad
    config = load_config(None, {"train_data": str(train), "validation_data": str(validation), "max_examples": "150"})
    write_splits(config, tmp_path / "prepared")
    return tmp_path / "prepared"


def request(prepared: Path, run_id: str = "run-1", epochs: int = 2) -> TuningRequest:
    return TuningRequest(run_id=run_id, base_model="span-ranker-base", prepared_dir=prepared, epochs=epochs,
                         learning_rate=0.01, batch_size=16, seed=0, suffix="t")


def wait(provider, job_id: str):
    """Until the job ends; fails only when its trainer stops moving (see tests/waiting.py), never on a clock."""
    return until(lambda: (job := provider.get_job(job_id)).state in TERMINAL_STATES and job,
                 job_progress(provider.jobs_dir / job_id), what=f"local job {job_id}")


def test_job_runs_in_the_background_and_pages_events_with_a_cursor(prepared):
    provider = get_provider("local", load_config(None))
    assert isinstance(provider, Provider)
    assert provider.preflight(request(prepared)).n_train == 150
    job = provider.start_job(request(prepared))
    assert job.job_id.startswith("localjob-")
    points, cursor = [], None

    def poll() -> bool:
        nonlocal cursor
        state = provider.get_job(job.job_id).state
        page = provider.read_metrics(job.job_id, cursor)
        points.extend(page.points)
        cursor = page.next_cursor
        return state in TERMINAL_STATES

    until(poll, job_progress(provider.jobs_dir / job.job_id), interval=0.02, what="the local job")
    final = provider.get_job(job.job_id)
    assert final.state is JobState.SUCCEEDED and final.tuned_model == f"{job.job_id}/weights.npz"
    assert provider.weights_file(final.tuned_model) == (provider.jobs_dir / job.job_id / "weights.npz").resolve()
    assert final.tags == {"local.best_checkpoint": "epoch-2"}  # nothing naming this machine's folders
    train_steps = [p.step for p in points if p.key == "train_loss"]
    assert train_steps == list(range(1, len(train_steps) + 1))  # every step once, in order
    assert provider.read_metrics(job.job_id, cursor).points == []  # nothing is read twice
    assert len(provider.read_metrics(job.job_id, None).points) == len(points)
    assert final.metrics["completed_step_count"] == len(train_steps)
    assert list(provider.list_jobs()) == [job.job_id]
    prediction = provider.predict(final.tuned_model, "Who?", "Ada Lovelace wrote the notes.")
    assert prediction.text and prediction.latency_ms >= 0


def test_each_epoch_is_a_checkpoint_and_the_best_by_val_loss_is_the_tuned_model(prepared):
    provider = get_provider("local", load_config(None))
    job = wait(provider, provider.start_job(request(prepared, epochs=3)).job_id)
    checkpoints = provider.checkpoints(job.job_id)
    assert [c.epoch for c in checkpoints] == [1, 2, 3]
    assert [c.checkpoint_id for c in checkpoints] == ["epoch-1", "epoch-2", "epoch-3"]
    assert checkpoints[-1].step == job.metrics["completed_step_count"]
    # Checkpoint models are named inside the jobs home like the tuned model, never by an absolute path.
    assert [c.model for c in checkpoints] == [f"{job.job_id}/checkpoints/epoch-{e}.npz" for e in (1, 2, 3)]
    assert all(provider.weights_file(c.model).exists() and c.metrics["val_loss"] > 0 for c in checkpoints)
    best = min(checkpoints, key=lambda c: c.metrics["val_loss"])
    assert job.metrics["best_epoch"] == best.epoch and job.metrics["best_step"] == best.step
    assert job.metrics["best_val_loss"] == best.metrics["val_loss"]
    assert job.tags["local.best_checkpoint"] == best.checkpoint_id
    assert provider.weights_file(job.tuned_model).read_bytes() == provider.weights_file(best.model).read_bytes()
    # So tune scores that checkpoint from the final model's rows instead of asking the same questions again.
    assert [provider.same_model(c.model, job.tuned_model) for c in checkpoints] == [c is best for c in checkpoints]
    assert not provider.same_model("span-ranker-base", job.tuned_model)
    for checkpoint in checkpoints:  # every checkpoint is a usable model
        assert provider.predict(checkpoint.model, "Who?", "Ada Lovelace wrote the notes.").text


def test_serving_answers_an_empty_context_with_an_empty_string_and_keeps_its_cache_bounded():
    provider = get_provider("local", load_config(None))
    assert provider.predict("span-ranker-base", "Who wrote it?", "").text == ""
    assert provider.predict("span-ranker-base", "Who wrote it?", " ... ").text == ""
    cache = provider.passage_cache
    big = " ".join(f"Ada Lovelace wrote note {k} in 1843." for k in range(40_000))  # ~1.3 MB, ~280k tokens
    assert provider.predict("span-ranker-base", "When did Ada write note 7?", big).text
    assert len(cache) == 2 and big not in cache  # larger than the whole byte budget: answered, never kept
    for k in range(cache.max_entries + 20):
        provider.predict("span-ranker-base", "Who wrote it?", f"Context number {k} was written by Ada.")
    assert len(cache) == cache.max_entries and cache.total_bytes <= cache.max_bytes


def test_the_passage_cache_evicts_by_entries_and_by_bytes():
    cache = BoundedCache(lambda key: "x" * key, len, max_entries=3, max_bytes=10)
    assert cache.get(4) == "xxxx" and cache.get(5) == "xxxxx" and cache.total_bytes == 9
    cache.get(3)  # 12 bytes > 10: the least recently used (4) goes
    assert 4 not in cache and 5 in cache and cache.total_bytes == 8
    cache.get(5), cache.get(1), cache.get(2)  # 4 entries > 3: 3 goes (5 was used more recently)
    assert len(cache) == 3 and 3 not in cache and 5 in cache
    assert cache.get(11) == "x" * 11 and 11 not in cache  # over the byte budget on its own: not kept


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
    seen = {}

    def kill_each_trainer() -> bool:
        seen["job"] = provider.get_job(job.job_id)  # notices a dead trainer: restarts it, or gives up
        if seen["job"].state is JobState.FAILED:
            return True
        pid = json.loads(pid_file.read_text())["pid"] if pid_file.exists() else None
        if pid is not None and pid not in killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        return False

    until(kill_each_trainer, lambda: (len(killed), job_progress(provider.jobs_dir / job.job_id)()), interval=0.02,
          what="the job neither restarted nor failed")
    current = seen["job"]
    assert current.error_code == "trainer_died" and len(killed) == LocalProvider.max_restarts + 1
    assert len(restart_times(provider.jobs_dir / job.job_id)) == LocalProvider.max_restarts


def wait_for_file(path: Path) -> Path:
    """Until a job's file appears, while the job's launched trainer keeps moving."""
    until(path.exists, job_progress(path.parent), interval=0.02, what=f"{path} to appear")
    return path


def test_a_redundant_trainer_launch_leaves_the_running_job_alone(prepared):
    """A crash right after launching a trainer makes the rerun launch again: the second trainer must bow out."""
    provider = get_provider("local", load_config(None))
    job = provider.start_job(request(prepared, epochs=3))
    job_dir = provider.jobs_dir / job.job_id
    first = json.loads(wait_for_file(job_dir / "pid.json").read_text())["pid"]
    # The first trainer may finish before a second interpreter starts: hold the job's lock as it does meanwhile.
    with open(job_dir / "trainer.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while the first trainer holds it, then stands in for it
        second = run_watched([sys.executable, "-m", "finetune_mlflow.providers.local.trainer", str(job_dir)])
    assert second.returncode == 0 and "another trainer holds this job" in second.stderr
    final = wait(provider, job.job_id)
    assert final.state is JobState.SUCCEEDED
    assert json.loads((job_dir / "pid.json").read_text())["pid"] == first
    steps = [p.step for p in provider.read_metrics(job.job_id, None).points if p.key == "train_loss"]
    assert steps == sorted(set(steps))


def test_weights_from_the_previous_model_format_are_a_clear_error(tmp_path):
    (tmp_path / "localjob-old").mkdir()
    np.savez(tmp_path / "localjob-old" / "weights.npz", start=np.zeros((9, 3)), idf_words=np.array(["a"]),
             idf_values=np.ones(1), max_span_tokens=np.array(8))
    provider = get_provider("local", load_config(None, {"local.jobs_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="another version of the local model .*retrain"):
        provider.predict("localjob-old/weights.npz", "q", "c")


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


@pytest.mark.parametrize("model_id", ["/etc/weights.npz", "../weights.npz", "../../x/weights.npz", "a/../weights.npz",
                                      "job/../../weights.npz", "job/other.txt", "weights.npz", "a/b/weights.npz",
                                      "..\\x\\weights.npz", "./weights.npz"])
def test_a_model_id_never_names_a_file_outside_the_jobs_home(model_id, tmp_path):
    jobs = tmp_path / "jobs"
    (tmp_path / "weights.npz").write_bytes(b"not in the jobs home")
    jobs.mkdir()
    with pytest.raises(ConfigError, match="neither 'span-ranker-base' nor '<job_id>/weights.npz'"):
        weights_file(jobs, model_id)


def test_a_job_folder_linking_out_of_the_jobs_home_is_refused(tmp_path):
    jobs, outside = tmp_path / "jobs", tmp_path / "outside"
    jobs.mkdir()
    outside.mkdir()
    (outside / "weights.npz").write_bytes(b"elsewhere")
    (jobs / "localjob-link").symlink_to(outside)
    with pytest.raises(ConfigError, match="resolves outside the local jobs home"):
        weights_file(jobs, "localjob-link/weights.npz")
    (jobs / "localjob-real").mkdir()
    (jobs / "localjob-real" / "weights.npz").write_bytes(b"w")
    assert weights_file(jobs, "localjob-real/weights.npz") == (jobs / "localjob-real" / "weights.npz").resolve()


def test_the_step_total_counts_only_the_examples_the_trainer_keeps(prepared):
    """Examples with no candidate span are skipped by the trainer: the progress line's total (and its epoch
    fraction) must end at the last step, not short of a total that counted them."""
    from finetune_mlflow.progress import Progress
    from finetune_mlflow.providers.base import MetricPoint

    provider = get_provider("local", load_config(None, {"local.max_span_tokens": "2"}))  # longer answers: skipped
    job = wait(provider, provider.start_job(dataclasses.replace(request(prepared, epochs=2), batch_size=4)).job_id)
    skipped, steps = job.metrics["skipped_unanswerable_examples"], job.metrics["completed_step_count"]
    assert skipped >= 8, "the setup must skip enough examples to change the step count"
    assert job.total_steps == steps == 2 * -(-(150 - skipped) // 4)
    progress = Progress(started=0.0)
    progress.update([MetricPoint("train_loss", 1.0, int(steps), 0)], now=1.0)
    assert f"step {steps:.0f}/{steps:.0f} (epoch 2.0/2)" in progress.line(job, now=2.0)

"""The transformers provider on a tiny Llama built on the fly: bad input refused before launch, a background LoRA
job that streams losses and yields a merged model that learned the toy set, resume after kill -9, batched predict."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the transformers provider needs the extra: pip install -e '.[transformers]'")
pytest.importorskip("trl", reason="the transformers provider needs the extra: pip install -e '.[transformers]'")

from finetune_mlflow.config import load_config  # noqa: E402
from finetune_mlflow.errors import ConfigError, DataError  # noqa: E402
from finetune_mlflow.liveness import pid_alive  # noqa: E402
from finetune_mlflow.providers import get_provider  # noqa: E402
from finetune_mlflow.providers.base import TERMINAL_STATES, JobState, TuningRequest  # noqa: E402
from finetune_mlflow.squad_metrics import best_over_golds  # noqa: E402
from tests.waiting import job_progress, until  # noqa: E402
from tests.hf_tiny import FACTS, PASSAGES, build_tiny_model, toy_examples, write_prepared  # noqa: E402

SETTINGS = {"provider": "transformers", "transformers.target_modules": "all-linear", "transformers.lora_r": "16",
            "transformers.lora_alpha": "32", "transformers.lora_dropout": "0", "transformers.logging_steps": "1",
            "transformers.eval_steps": "4", "transformers.max_new_tokens": "6", "transformers.device": "cpu",
            "transformers.eval_batch_size": "16", "transformers.max_seq_length": "256"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), PASSAGES + [a for _, a in FACTS])


@pytest.fixture
def prepared(tmp_path) -> Path:
    examples = toy_examples(PASSAGES)
    return write_prepared(tmp_path / "prepared", examples[:12], examples[12:])


def provider_for(**overrides: str):
    return get_provider("transformers", load_config(None, {**SETTINGS, **overrides}))


def request(model: Path, prepared: Path, run_id: str = "run-1", epochs: int = 10) -> TuningRequest:
    return TuningRequest(run_id=run_id, base_model=str(model), prepared_dir=prepared, epochs=epochs,
                         learning_rate=0.03, batch_size=4, seed=0, suffix="t")


def wait(provider, job_id: str):
    """Until the job ends; fails only when its trainer stops moving (see tests/waiting.py), never on a clock."""
    job_dir = provider.jobs_dir / job_id
    return until(lambda: (job := provider.get_job(job_id)).state in TERMINAL_STATES and job, job_progress(job_dir),
                 interval=0.2, what=f"transformers job {job_id}")


def mean_f1(provider, model: str, examples: list[dict]) -> float:
    predictions = provider.predict_batch(model, [(e["question"], e["context"]) for e in examples])
    return sum(best_over_golds(p.text, e["answers"])[1] for p, e in zip(predictions, examples)) / len(examples)


def test_bad_input_is_one_line_before_any_job(tiny_model, prepared, tmp_path, monkeypatch):
    provider = provider_for()
    with pytest.raises(ConfigError, match="does not exist"):
        provider.preflight(request(tmp_path / "no-such-model", prepared))
    with pytest.raises(ConfigError, match="no-such.gguf does not exist"):
        provider.preflight(request(tmp_path / "no-such.gguf", prepared))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hub id .* offline"):
        provider.preflight(TuningRequest("r", "some-org/some-model", prepared, 1, 0.1, 1, 0, "t"))
    with pytest.raises(ConfigError, match="'qkv_proj' matches no module"):
        provider_for(**{"transformers.target_modules": "q_proj,qkv_proj"}).preflight(request(tiny_model, prepared))
    with pytest.raises(DataError, match=r"transformers/train.jsonl:1: example is \d+ tokens .*max_seq_length=16"):
        provider_for(**{"transformers.max_seq_length": "16"}).preflight(request(tiny_model, prepared))
    for error in (ConfigError, DataError):
        assert "\n" not in str(error)
    assert not list((tmp_path / "home").glob("hf-jobs/*")), "no job may exist after a refused preflight"
    report = provider.preflight(request(tiny_model, prepared))
    assert (report.n_train, report.n_validation) == (12, 4) and report.estimated_train_tokens > 12 * 40


def kill_after_first_checkpoint(job_dir: Path) -> None:
    until(lambda: list((job_dir / "hf").glob("checkpoint-*/trainer_state.json")) and (job_dir / "pid.json").exists(),
          job_progress(job_dir), interval=0.1, what="the first checkpoint")
    os.kill(json.loads((job_dir / "pid.json").read_text())["pid"], signal.SIGKILL)
    time.sleep(0.3)


def workers_of(job_dir: Path) -> list[int]:
    """Pids of the `--worker` processes `accelerate launch` started for this job."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker" in command and str(job_dir).encode() in command:
            found.append(int(proc.name))
    return found


def test_a_job_streams_losses_survives_kill_9_and_its_merged_model_learned_the_toy_set(tiny_model, prepared):
    """One job for all of it (each trainer process costs seconds of imports): killed after its first checkpoint,
    restarted by the rerun's start_job, resumed from that checkpoint, finished, merged, better than the base."""
    provider = provider_for(**{"transformers.save_steps": "2"})
    job = provider.start_job(request(tiny_model, prepared))
    assert job.job_id.startswith("hfjob-")
    job_dir = Path(job.tags["transformers.job_dir"])
    kill_after_first_checkpoint(job_dir)
    rerun = provider.start_job(request(tiny_model, prepared))
    assert rerun.job_id == job.job_id and rerun.state is JobState.RUNNING
    final = wait(provider, job.job_id)
    assert final.state is JobState.SUCCEEDED, (job_dir / "trainer.log").read_text()
    assert final.metrics["resumed"] == 1.0 and "resuming from" in (job_dir / "trainer.log").read_text()
    points = provider.read_metrics(job.job_id, None).points
    train = [p for p in points if p.key == "train_loss"]
    val = [p for p in points if p.key == "val_loss"]
    assert [p.step for p in train] == list(range(1, 31))  # 12 examples / batch 4 * 10 epochs, each step once
    assert final.metrics["completed_step_count"] == 30
    assert val and val[-1].value < val[0].value and train[-1].value < train[0].value
    checkpoints = json.loads((job_dir / "status.json").read_text())["checkpoints"]
    assert [c["epoch"] for c in checkpoints] == list(range(1, 11))
    assert all(Path(c["path"], "adapter_model.safetensors").exists() and c["val_loss"] > 0 for c in checkpoints)
    assert Path(final.tuned_model, "config.json").exists() and Path(final.tuned_model, "tokenizer.json").exists()
    examples = toy_examples(PASSAGES)
    assert mean_f1(provider, str(tiny_model), examples) < 0.2
    assert mean_f1(provider, final.tuned_model, examples) > 0.75
    one = provider.predict(final.tuned_model, FACTS[0][0], PASSAGES[3])
    assert one.text == "blue" and one.output_tokens >= 1 and one.input_tokens > 20 and one.latency_ms > 0
    served_answers_equal_the_batch(provider, final.tuned_model, examples[:6])


def served_answers_equal_the_batch(provider, tuned_model: str, examples: list[dict]) -> None:
    """The registered version ships the merged model: loaded with the jobs folder gone, its pyfunc answers a
    DataFrame in one batched generation, the same answers as the provider's."""
    import mlflow
    import pandas as pd

    from finetune_mlflow.registry import register_tuned_model

    expected = [p.text for p in provider.predict_batch(tuned_model, [(e["question"], e["context"]) for e in examples])]
    with mlflow.start_run() as run:
        version = register_tuned_model(
            run_id=run.info.run_id, config=provider.config, provider="transformers", model_id=tuned_model,
            logged_model_id=None, artifacts=provider.model_artifacts(tuned_model),
            packages=provider.serving_packages, tags={}, description="tiny")
    moved = Path(tuned_model).parent.with_name("moved-away")
    Path(tuned_model).parent.rename(moved)
    try:
        model = mlflow.pyfunc.load_model(version.model_uri)
        answers = model.predict(pd.DataFrame({"question": [e["question"] for e in examples],
                                              "context": [e["context"] for e in examples]}))
    finally:
        moved.rename(Path(tuned_model).parent)
    assert list(answers["answer"]) == expected


def test_a_trainer_that_keeps_dying_fails_the_job(tiny_model, prepared):
    provider = provider_for(**{"transformers.max_restarts": "0"})
    job = provider.start_job(request(tiny_model, prepared, run_id="dies"))
    job_dir = Path(job.tags["transformers.job_dir"])
    pid = json.loads((job_dir / "launch.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    final = wait(provider, job.job_id)
    assert final.state is JobState.FAILED and final.error_code == "trainer_died"


def test_predict_batch_keeps_order_and_splits_latency(tiny_model):
    provider = provider_for(**{"transformers.eval_batch_size": "3"})
    pairs = [(q, PASSAGES[i % 4] * (1 + i % 3)) for i, (q, _) in enumerate(FACTS * 2)]
    batch = provider.predict_batch(str(tiny_model), pairs)
    singles = [provider.predict(str(tiny_model), q, c) for q, c in pairs]
    assert [p.text for p in batch] == [p.text for p in singles]  # greedy: batching changes no answer
    assert [p.input_tokens for p in batch] == [p.input_tokens for p in singles]
    assert len({p.latency_ms for p in batch}) <= 3  # one latency per batch of 3: 8 pairs -> 3 batches


def test_several_workers_through_accelerate_launch_train_one_job_and_a_dead_launcher_leaves_no_worker(
        tiny_model, prepared):
    """num_processes=2 on the CPU: `accelerate launch` runs two gloo workers (the same command runs one per GPU).
    Each step is logged once (rank 0), a step covers both workers' batches, and after kill -9 of the process that
    launched them the relaunch stops the orphaned workers, then resumes from the last checkpoint."""
    provider = provider_for(**{"transformers.num_processes": "2", "transformers.save_steps": "2"})
    job = provider.start_job(request(tiny_model, prepared, run_id="ddp", epochs=6))
    job_dir = Path(job.tags["transformers.job_dir"])
    kill_after_first_checkpoint(job_dir)
    orphans = workers_of(job_dir)
    final = wait(provider, job.job_id)
    assert final.state is JobState.SUCCEEDED, (job_dir / "trainer.log").read_text()[-3000:]
    assert orphans and not any(pid_alive(pid) for pid in orphans)
    assert final.metrics["num_processes"] == 2 and final.metrics["resumed"] == 1.0
    train = [p.step for p in provider.read_metrics(job.job_id, None).points if p.key == "train_loss"]
    assert train == list(range(1, 13))  # 12 examples / (batch 4 x 2 workers) = 2 steps per epoch, each once
    assert [c["epoch"] for c in json.loads((job_dir / "status.json").read_text())["checkpoints"]] == list(range(1, 7))
    assert Path(final.tuned_model, "config.json").exists()


def test_an_epoch_checkpoint_saved_but_never_listed_is_recovered(tmp_path):
    """A trainer killed between Hugging Face's save and our callback leaves an unlisted epoch-end checkpoint;
    mid-epoch and half-written ones stay out."""
    from finetune_mlflow.providers.transformers.job_events import recovered_checkpoints

    def checkpoint(step: int, epoch: float, complete: bool = True) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "global_step": step, "log_history": [
                {"loss": 1.0, "step": step}, {"eval_loss": 0.5 / epoch, "step": step}]}))

    checkpoint(2, 1.0), checkpoint(3, 1.5), checkpoint(4, 2.0), checkpoint(6, 3.0, complete=False)
    listed = [{"checkpoint_id": "epoch-1", "epoch": 1, "step": 2, "path": str(tmp_path / "checkpoint-2"),
               "val_loss": 0.5}]
    found = recovered_checkpoints(tmp_path, listed)
    assert [(c["checkpoint_id"], c["step"], c["val_loss"]) for c in found] == [("epoch-1", 2, 0.5), ("epoch-2", 4, 0.25)]


def test_restart_counts_written_by_earlier_versions_still_count(tmp_path):
    from finetune_mlflow.providers.job_dir import restart_times

    assert restart_times(tmp_path) == []
    (tmp_path / "restarts.json").write_text('{"count": 2}')
    assert restart_times(tmp_path) == [0.0, 0.0]
    (tmp_path / "restarts.json").write_text("[1.5]")
    assert restart_times(tmp_path) == [1.5]


def test_cancel_stops_the_trainer_and_the_job_stays_cancelled(tiny_model, prepared):
    provider = provider_for()
    job = provider.start_job(request(tiny_model, prepared, run_id="cancel", epochs=200))
    job_dir = Path(job.tags["transformers.job_dir"])
    pid = json.loads((job_dir / "launch.json").read_text())["pid"]
    cancelled = provider.cancel_job(job.job_id)
    assert cancelled.state is JobState.CANCELLED and not pid_alive(pid)
    assert provider.get_job(job.job_id).state is JobState.CANCELLED  # a dead trainer is not restarted

"""The transformers provider's background job: `python -m finetune_mlflow.providers.transformers.trainer <job_dir>`.

LoRA-tunes the base model with trl's SFTTrainer on the prepared chat data (loss on the answer only), streams losses
to `events.jsonl`, saves a resumable Hugging Face checkpoint at each epoch end (and every `save_steps`), and at
the end writes the merged model (base + adapter) and its tokenizer to `model/`. A trainer that finds checkpoints
from an earlier, killed trainer of the same job resumes from the last one instead of starting over.

With `num_processes` > 1 in the spec, this process keeps the job's lock and runs `accelerate launch` (data-parallel
workers: one per GPU, or gloo processes on the CPU), each worker being this module with `--worker`; only the
first worker (rank 0) writes events, checkpoints, status and the merged model.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune_mlflow.providers.job_dir import record_failure, run_trainer, write_json_atomic
from finetune_mlflow.records import read_jsonl

TRAINER_MODULE = "finetune_mlflow.providers.transformers.trainer"
WORKER_FLAG = "--worker"
HF_OUTPUT = "hf"  # Hugging Face Trainer output_dir: checkpoint-<step>/ folders
MODEL_DIR = "model"  # the merged model + tokenizer: what predict and registration use


def write_status(job_dir: Path, state: str, **fields: Any) -> None:
    write_json_atomic(job_dir / "status.json", {"state": state, "updated": time.time(), **fields})


def _datasets(spec: dict, tokenizer: Any) -> tuple[Any, Any]:
    from datasets import Dataset

    from finetune_mlflow.providers.transformers.chat_format import training_pair

    train = [training_pair(tokenizer, record) for record in read_jsonl(spec["train"])]
    validation = [training_pair(tokenizer, record) for record in read_jsonl(spec["validation"])]
    return Dataset.from_list(train), Dataset.from_list(validation[: spec["val_loss_examples"]])


def _arguments(spec: dict, job_dir: Path, device: str, precision: str) -> Any:
    from trl import SFTConfig

    eval_steps = spec["eval_steps"]
    return SFTConfig(
        output_dir=str(job_dir / HF_OUTPUT), num_train_epochs=spec["epochs"], learning_rate=spec["learning_rate"],
        per_device_train_batch_size=spec["batch_size"], per_device_eval_batch_size=spec["eval_batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"], logging_steps=spec["logging_steps"],
        eval_strategy="steps" if eval_steps else "epoch", eval_steps=eval_steps or None, save_strategy="epoch",
        seed=spec["seed"], max_length=spec["max_seq_length"], completion_only_loss=True, packing=False,
        use_cpu=device == "cpu", bf16=precision == "bf16", fp16=precision == "fp16", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False, lr_scheduler_type="linear", warmup_steps=0,
    )


def build_trainer(spec: dict, job_dir: Path, callback: Any) -> Any:
    import torch
    from peft import LoraConfig
    from trl import SFTTrainer

    from finetune_mlflow.providers.transformers import model_source
    from finetune_mlflow.providers.transformers.checks import target_list

    device = model_source.resolve_device(spec["device"])
    precision = model_source.training_precision(spec["precision"], device)
    source = model_source.resolve(spec["base_model"])
    tokenizer = model_source.load_tokenizer(source)
    model = model_source.load_model(source, torch.float32)  # fp32 master weights; bf16/fp16 run as autocast
    train, validation = _datasets(spec, tokenizer)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=target_list(spec["target_modules"]), task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=_arguments(spec, job_dir, device, precision), train_dataset=train,
                      eval_dataset=validation, processing_class=tokenizer, peft_config=lora, callbacks=[callback])


def save_merged(trainer: Any, job_dir: Path) -> Path:
    """Base weights + adapter merged into one plain model, written under a temporary name and renamed."""
    final, tmp = job_dir / MODEL_DIR, job_dir / (MODEL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    trainer.processing_class.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def peak_memory_mb() -> dict[str, float]:
    import torch

    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        peaks["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint a killed trainer finished writing: Hugging Face writes trainer_state.json after the
    weights and optimizer, so a folder without it was cut off mid-save and is passed over."""
    complete = [d for d in output_dir.glob("checkpoint-*") if (d / "trainer_state.json").exists()]
    return str(max(complete, key=lambda d: int(d.name.rsplit("-", 1)[1]))) if complete else None


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` (torchrun sets RANK), and the single process otherwise."""
    return int(os.environ.get("RANK", "0")) == 0


def run(job_dir: Path) -> None:
    from finetune_mlflow.providers.transformers.job_events import JobEvents, read_checkpoints

    spec = json.loads((job_dir / "spec.json").read_text(encoding="utf-8"))
    main = is_main_process()
    progress: dict[str, float] = {}

    def publish(metrics: dict) -> None:
        progress.update(metrics)
        if main:
            write_status(job_dir, "running", metrics=progress, checkpoints=read_checkpoints(job_dir))

    publish({})
    started = time.monotonic()
    trainer = build_trainer(spec, job_dir, JobEvents(job_dir, spec["save_steps"], publish))
    resume = last_complete_checkpoint(job_dir / HF_OUTPUT)
    if resume and main:
        print(f"resuming from {resume}", file=sys.stderr, flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    if not main:
        return
    model_dir = save_merged(trainer, job_dir)
    write_status(job_dir, "succeeded", tuned_model=str(model_dir), checkpoints=read_checkpoints(job_dir), metrics={
        **progress, "completed_step_count": trainer.state.global_step, "train_runtime_s": result.metrics.get(
            "train_runtime", 0.0), "job_wall_s": time.monotonic() - started, "resumed": float(bool(resume)),
        "num_processes": float(trainer.args.world_size), **peak_memory_mb()})


def free_port() -> int:
    """A loopback port for the workers' rendezvous (torchrun's fixed default would collide between two jobs)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(job_dir: Path, processes: int) -> list[str]:
    """`accelerate launch` of `processes` data-parallel workers of this module (one machine, one per GPU)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--num_processes", str(processes), "--main_process_ip", "127.0.0.1", "--main_process_port",
            str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "--module", TRAINER_MODULE,
            WORKER_FLAG, str(job_dir)]


def run_distributed(job_dir: Path, processes: int) -> None:
    """Run the workers and wait; a failure the workers did not record themselves becomes this job's error."""
    code = subprocess.call(launch_command(job_dir, processes), stdin=subprocess.DEVNULL)
    status = json.loads((job_dir / "status.json").read_text(encoding="utf-8"))
    if code != 0 and status["state"] != "failed":
        raise RuntimeError(f"accelerate launch of {processes} workers exited with status {code}; see trainer.log")


def train(job_dir: Path) -> None:
    processes = json.loads((job_dir / "spec.json").read_text(encoding="utf-8")).get("num_processes", 1)
    if processes > 1:
        run_distributed(job_dir, processes)
    else:
        run(job_dir)


def main(argv: list[str]) -> int:
    if argv[1] == WORKER_FLAG:
        job_dir = Path(argv[2])
        try:
            run(job_dir)
        except Exception as error:  # rank 0 records it, as the single-process trainer would; torchrun sees it too
            if is_main_process():
                record_failure(job_dir, error)
            raise
        return 0
    return run_trainer(Path(argv[1]), train)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

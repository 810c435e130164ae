"""LoRA fine-tuning of an open-weights causal LM on this machine (GPU when there is one), shaped like a cloud job.

The job directory is the shared one (providers/job_dir.py: `spec.json`, `status.json` replaced atomically,
`events.jsonl` read with a byte-offset cursor, a lock and pid file held by a detached trainer, a dead trainer
relaunched by the next `get_job`). What differs from the local provider: a relaunched trainer resumes from its
last Hugging Face checkpoint (up to `transformers.max_restarts` times), and `transformers.num_processes` > 1 trains
with several processes through `accelerate launch`.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import uuid
from pathlib import Path

from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.providers.base import (
    MODEL_ARTIFACT,
    JobState,
    Prediction,
    PreflightReport,
    TuningJob,
    TuningRequest,
)
from finetune_mlflow.providers.job_dir import JobDirectoryProvider, jobs_home, write_json_atomic
from finetune_mlflow.prompt import clean_completion
from finetune_mlflow.providers.transformers.requirements import SERVING_PACKAGES
from finetune_mlflow.records import read_jsonl

logger = logging.getLogger(__name__)

TRAINER_MODULE = "finetune_mlflow.providers.transformers.trainer"
DEFAULT_BATCH_SIZE = 8
CHAT_RECORDS = Path("transformers")  # prepared/transformers/: system, user (shared prompt), assistant (answer)


def _require_extra() -> None:
    missing = [module for module in ("torch", "transformers", "peft", "trl") if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"provider transformers needs {', '.join(missing)}: pip install -e '.[transformers]'")


class TransformersProvider(JobDirectoryProvider):
    """LoRA fine-tuning of an open-weights causal LM by a detached trl trainer on this machine (CPU or GPU)."""

    name = "transformers"
    max_concurrency = 1  # one in-process model; predict_batch is where the throughput comes from
    batched_prediction = True
    serving_packages = SERVING_PACKAGES
    trainer_module = TRAINER_MODULE
    relaunch_note = "restarted it; it resumes from its last checkpoint"

    def __init__(self, config: Config):
        _require_extra()
        self.config = config
        self.settings = config.transformers
        self.jobs_dir = Path(self.settings.jobs_dir) if self.settings.jobs_dir else jobs_home("hf-jobs")
        self.max_restarts = self.settings.max_restarts

    def preflight(self, request: TuningRequest) -> PreflightReport:
        """Every check that can fail before a job exists: base model, LoRA targets, example lengths."""
        from finetune_mlflow.providers.transformers import checks, model_source

        checks.check_processes(self.settings.num_processes, model_source.resolve_device(self.settings.device))
        source = model_source.resolve(request.base_model)
        checks.check_lora_targets(self.settings.target_modules, checks.module_names(model_source.model_config(source)))
        tokenizer = model_source.load_tokenizer(source)
        counts = {}
        for split in ("train", "validation"):
            path = request.prepared_dir / CHAT_RECORDS / f"{split}.jsonl"
            records = read_jsonl(path)
            counts[split] = (len(records), checks.check_lengths(tokenizer, records, path, self.settings.max_seq_length))
        tokens = counts["train"][1]
        return PreflightReport(counts["train"][0], counts["validation"][0], tokens, tokens * request.epochs, 0.0)

    def _spec(self, job_id: str, request: TuningRequest) -> dict:
        chat = request.prepared_dir / CHAT_RECORDS
        s = self.settings
        return {
            "job_id": job_id, "run_id": request.run_id, "base_model": request.base_model,
            "train": str((chat / "train.jsonl").resolve()), "validation": str((chat / "validation.jsonl").resolve()),
            "epochs": request.epochs, "learning_rate": request.learning_rate, "seed": request.seed,
            "batch_size": request.batch_size or DEFAULT_BATCH_SIZE, "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
            "lora_dropout": s.lora_dropout, "target_modules": s.target_modules, "max_seq_length": s.max_seq_length,
            "precision": s.precision, "device": s.device, "eval_batch_size": s.eval_batch_size,
            "gradient_accumulation_steps": s.gradient_accumulation_steps, "logging_steps": s.logging_steps,
            "eval_steps": s.eval_steps, "val_loss_examples": s.val_loss_examples, "save_steps": s.save_steps,
            "num_processes": s.num_processes,
        }

    def start_job(self, request: TuningRequest) -> TuningJob:
        """Create the job directory and launch its trainer; a job this run already created is adopted instead."""
        job_id = self._job_for_run(request.run_id)
        if job_id:
            logger.info("run %s already created transformers job %s: adopting it", request.run_id, job_id)
            return self.get_job(job_id)
        job_id = f"hfjob-{uuid.uuid4().hex[:12]}"
        job_dir = self._job_dir(job_id)
        job_dir.mkdir(parents=True)
        write_json_atomic(job_dir / "spec.json", self._spec(job_id, request))
        write_json_atomic(job_dir / "status.json", {"state": "pending", "updated": time.time()})
        self._launch(job_dir)
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> TuningJob:
        return self._job(job_id, self._checked_status(job_id))

    def _job(self, job_id: str, status: dict) -> TuningJob:
        checkpoints = status.get("checkpoints", [])
        tags = {"transformers.job_dir": str(self._job_dir(job_id))}
        if "restarts" in status:
            tags["transformers.trainer_restarts"] = str(status["restarts"])
        if checkpoints:
            tags["transformers.checkpoints"] = ",".join(c["checkpoint_id"] for c in checkpoints)
        return TuningJob(job_id=job_id, state=JobState(status["state"]), provider_status=status["state"],
                         tuned_model=status.get("tuned_model"), error_code=status.get("error_code"),
                         error_message=status.get("error_message"), tags=tags,
                         metrics={k: float(v) for k, v in status.get("metrics", {}).items()})

    def model_artifacts(self, model: str) -> dict[str, str]:
        return {MODEL_ARTIFACT: model}  # the merged model's folder

    def predict(self, model: str, question: str, context: str) -> Prediction:
        return self.predict_batch(model, [(question, context)])[0]

    def predict_batch(self, model: str, pairs: list[tuple[str, str]]) -> list[Prediction]:
        """Greedy answers for (question, context) pairs, in input order, `transformers.eval_batch_size` at a time
        (sorted by prompt length so a batch pads little). A request's latency_ms is its batch's wall time divided
        by the batch size: the cost per request at this batch size, not the time one request alone would take."""
        from finetune_mlflow.providers.transformers import chat_format, generation, model_source

        s = self.settings
        lm, tokenizer = generation.loaded_model(model, model_source.resolve_device(s.device), s.precision)
        prompts = [chat_format.render_prompt(tokenizer, chat_format.prompt_messages(q, c)) for q, c in pairs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Prediction | None] = [None] * len(prompts)
        for start in range(0, len(order), s.eval_batch_size):
            batch = order[start:start + s.eval_batch_size]
            started = time.monotonic()
            generated = generation.generate(lm, tokenizer, [prompts[i] for i in batch], s.max_new_tokens)
            latency_ms = (time.monotonic() - started) * 1000.0 / len(batch)
            for index, output in zip(batch, generated):
                results[index] = Prediction(clean_completion(output.text), latency_ms, output.input_tokens,
                                            output.output_tokens)
        return results


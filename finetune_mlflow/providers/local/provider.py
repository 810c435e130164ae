"""The embedded default provider: trains the span ranker on this machine, shaped like a cloud tuning service.

A job is a directory (`<jobs_dir>/<job_id>/`) and a detached child process (`providers.local.trainer`)
that writes `status.json` (atomically replaced) and appends metric events to `events.jsonl`. The cursor for
`read_metrics` is a byte offset into that file, so a reader never sees an event twice and a rerun of `tune`
reattaches to a job that kept training while nobody watched.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import time
import uuid
from functools import lru_cache
from pathlib import Path, PurePosixPath
import re
import shutil

import numpy as np

from finetune_mlflow.providers.local import span_features, span_model
from finetune_mlflow.providers.local.passage_cache import BoundedCache
from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.providers.job_dir import TRAINER_PID, JobDirectoryProvider, jobs_home, write_json_atomic
from finetune_mlflow.providers.base import (
    MODEL_ARTIFACT,
    Checkpoint,
    JobState,
    Prediction,
    PreflightReport,
    TuningJob,
    TuningRequest,
)

logger = logging.getLogger(__name__)

BASE_MODEL = "span-ranker-base"
WEIGHTS_FILE = "weights.npz"
CHECKPOINT_DIR = "checkpoints"  # the trainer's per-epoch weights: `<job_id>/checkpoints/epoch-N.npz`
# A job id as a path component: one plain name, never "." or "..".
JOB_ID = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]+")
WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.npz")
PASSAGE_CACHE_ENTRIES = 256
PASSAGE_CACHE_BYTES = 64 << 20
# Tokens featurized and scored at once: a long context is answered window by window (see span_features.windows),
# so a request's memory follows this, not the context's length. SQuAD passages are under 1,000 tokens: one window.
WINDOW_TOKENS = 2048
TRAINER_MODULE = "finetune_mlflow.providers.local.trainer"


def weights_file(jobs_dir: Path, model_id: str) -> Path:
    """A tuned model id, `<job_id>/<file>.npz` (the final `weights.npz` or an epoch checkpoint), as its file inside
    the jobs home. Model ids come from run tags and registry metadata, so anything that could name a file elsewhere
    (absolute, `..`, a symlink out) is refused."""
    parts = PurePosixPath(model_id).parts
    inner = parts[1:-1]  # nothing, or the trainer's checkpoints folder
    if (len(parts) not in (2, 3) or not WEIGHTS_NAME.fullmatch(parts[-1]) or not JOB_ID.fullmatch(parts[0])
            or inner not in ((), (CHECKPOINT_DIR,)) or "\\" in model_id):
        raise ConfigError(f"local provider: model {model_id!r} is neither {BASE_MODEL!r} nor "
                          f"'<job_id>/{WEIGHTS_FILE}' inside the local jobs home")
    root = jobs_dir.resolve()
    path = root.joinpath(*parts).resolve()
    if path.parents[len(parts) - 1] != root:
        raise ConfigError(f"local provider: model {model_id!r} resolves outside the local jobs home")
    if not path.is_file():
        raise ConfigError(f"local provider: model {model_id!r} has no weights under the local jobs home {root} "
                          "(local jobs live on the machine that ran them; see the README's team section)")
    return path


WEIGHTS_FORMAT = 3  # 3: + question-head tables and wh-place features; 2: sparse span ranker; 1 had no format key


def save_weights(path: Path, weights: span_model.Weights, idf: dict[str, float], max_span_tokens: int) -> None:
    """Write to a temporary name and rename, so a reader never loads half a file."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"w_{k}": v for k, v in weights.blocks.items()}, format=np.array(WEIGHTS_FORMAT),
             idf_words=np.array(list(idf), dtype=str), idf_values=np.array(list(idf.values()), dtype=float),
             max_span_tokens=np.array(max_span_tokens))
    os.replace(tmp, path)


@lru_cache(maxsize=8)
def load_weights(path: str) -> tuple[span_model.Weights, dict[str, float], int]:
    with np.load(path) as data:
        if "format" not in data.files or int(data["format"]) != WEIGHTS_FORMAT:
            raise ConfigError(f"local provider: {path} was written by another version of the local model "
                              f"(weights format {int(data['format']) if 'format' in data.files else 1}, this one "
                              f"reads {WEIGHTS_FORMAT}); retrain it with tune")
        weights = span_model.Weights({k[2:]: data[k] for k in data.files if k.startswith("w_")})
        idf = dict(zip(data["idf_words"].tolist(), data["idf_values"].tolist()))
        return weights, idf, int(data["max_span_tokens"])


class LocalProvider(JobDirectoryProvider):
    """The embedded default: a span-ranking QA model trained by a detached process on this machine."""

    serving_packages = ("numpy",)
    name = "local"
    JOB_ID_PATTERN = re.compile(r"localjob-[0-9a-f]{12}")
    JOB_ID_EXAMPLE = "localjob- and 12 hex digits"
    max_concurrency = 1  # in-process numpy model: threads would only contend for the GIL
    max_parallel_jobs = os.cpu_count() or 1  # each job trains in its own process, one core each
    trainer_module = TRAINER_MODULE
    relaunch_note = "restarted it from scratch"

    def __init__(self, config: Config):
        self.config = config
        self.jobs_dir = Path(config.local.jobs_dir) if config.local.jobs_dir else jobs_home("local-jobs")
        # Featurized contexts for predict: questions about one context featurize it once; memory stays bounded.
        self.passage_cache = BoundedCache(span_features.passage, span_features.approx_bytes,
                                      PASSAGE_CACHE_ENTRIES, PASSAGE_CACHE_BYTES)

    def weights_file(self, model_id: str) -> Path:
        return weights_file(self.jobs_dir, model_id)

    def preflight(self, request: TuningRequest) -> PreflightReport:
        if request.base_model != BASE_MODEL:
            raise ConfigError(f"local provider: base_model {request.base_model!r} is unknown; the local provider "
                              f"trains {BASE_MODEL!r} (set tune.base_model or -P base_model={BASE_MODEL})")
        train = read_jsonl(request.prepared_dir / "train.jsonl")
        validation = read_jsonl(request.prepared_dir / "validation.jsonl")
        tokens = sum(approx_tokens(r["question"] + r["context"] + r["answers"][0]) for r in train)
        return PreflightReport(len(train), len(validation), tokens, tokens * request.epochs, 0.0)

    def start_job(self, request: TuningRequest) -> TuningJob:
        """Create the job directory and launch its trainer; a job this run already created is resumed instead."""
        job_id = self._job_for_run(request.run_id)
        if job_id:
            logger.info("run %s already created local job %s: adopting it", request.run_id, job_id)
        else:
            job_id = f"localjob-{uuid.uuid4().hex[:12]}"
            job_dir = self._job_dir(job_id)
            job_dir.mkdir(parents=True)
            # The job keeps its own copy of the data: the prepared folder is a scratch copy gone when tune exits,
            # and a resumed trainer reads the data again.
            for split in ("train", "validation"):
                shutil.copyfile(request.prepared_dir / f"{split}.jsonl", job_dir / f"{split}.jsonl")
            n_train = len(read_jsonl(job_dir / "train.jsonl"))
            batch_size = request.batch_size or 32
            write_json_atomic(job_dir / "spec.json", {
                # Counts every example; the trainer writes the real total once it knows which it skips.
                "total_steps": span_model.steps_for(n_train, request.epochs, batch_size),
                "job_id": job_id,
                "run_id": request.run_id,
                "train": str((job_dir / "train.jsonl").resolve()),
                "validation": str((job_dir / "validation.jsonl").resolve()),
                "epochs": request.epochs,
                "learning_rate": request.learning_rate,
                "batch_size": batch_size,
                "seed": request.seed,
                "max_span_tokens": self.config.local.max_span_tokens,
                "eval_every_steps": self.config.local.eval_every_steps,
                "validation_loss_examples": self.config.local.validation_loss_examples,
                "average_every_steps": self.config.local.average_every_steps,
            })
        job_dir = self._job_dir(job_id)
        # The trainer records its own pid once it holds the job's lock; until then nothing trains this job. A
        # launch that turns out redundant (a crash right after the previous one) finds the lock taken and exits.
        if not (job_dir / TRAINER_PID).exists():
            if not (job_dir / "status.json").exists():
                write_json_atomic(job_dir / "status.json", {"state": "pending", "updated": time.time()})
            self._launch(job_dir)
        return self.get_job(job_id)

    def _status_for_relaunch(self, job_dir: Path, status: dict) -> dict:
        """The local trainer starts over on the same job (the run's metric sink skips the steps it already holds)."""
        pending = {"state": "pending", "updated": time.time()}
        write_json_atomic(job_dir / "status.json", pending)
        return pending

    def get_job(self, job_id: str) -> TuningJob:
        status = self._checked_status(job_id)
        tags = {"local.best_checkpoint": status["best_checkpoint"]} if "best_checkpoint" in status else {}
        if "restarts" in status:
            tags["local.trainer_restarts"] = str(status["restarts"])
        return TuningJob(
            job_id=job_id, state=JobState(status["state"]), provider_status=status["state"],
            # Named relative to the jobs home, never by this machine's absolute path (see weights_file).
            tuned_model=f"{job_id}/{WEIGHTS_FILE}" if status.get("tuned_model") else None,
            error_code=status.get("error_code"), error_message=status.get("error_message"), tags=tags,
            metrics={k: float(v) for k, v in status.get("metrics", {}).items()},
            base_model=BASE_MODEL, **{**self._job_facts(self._job_dir(job_id)),
                                      **({"total_steps": status["total_steps"]} if status.get("total_steps") else {})},
        )

    @staticmethod
    def _job_facts(job_dir: Path) -> dict:
        """Hyperparameters under the shared names and the total step count, from the job's spec."""
        try:
            spec = json.loads((job_dir / "spec.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {"hyperparameters": {k: str(spec[k]) for k in ("epochs", "learning_rate", "batch_size") if k in spec},
                "total_steps": spec.get("total_steps")}

    def check_model(self, model: str) -> None:
        """The base model, or a tuned model's weights inside the jobs home (see `weights_file`)."""
        if model != BASE_MODEL:
            self.weights_file(model)

    def _model(self, model: str) -> tuple[span_model.Weights, dict[str, float], int]:
        if model == BASE_MODEL:
            size = self.config.local.max_span_tokens
            return span_model.initial_weights(size), {}, size
        return load_weights(str(self.weights_file(model)))

    def predict(self, model: str, question: str, context: str) -> Prediction:
        """An empty (or punctuation-only) context answers "" for its row instead of failing the batch."""
        weights, idf, size = self._model(model)
        started = time.monotonic()
        answer, best = "", float("-inf")
        for piece in span_features.windows(context, WINDOW_TOKENS):
            # Only a context that is one window is cached: a long one's windows would fill the cache for one use.
            featurized = self.passage_cache.get(piece) if piece is context else span_features.passage(piece)
            text, score = span_model.scored_answer(featurized, question, idf, weights, size)
            if score > best:
                answer, best = text, score
        return Prediction(answer, (time.monotonic() - started) * 1000.0)

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The per-epoch checkpoints the trainer lists in status.json (`checkpoints: [{checkpoint_id, epoch, step,
        path, val_loss}]`), oldest first; none when the trainer keeps none or an entry is unreadable."""
        try:
            status = json.loads((self._job_dir(job_id) / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        found = []
        for entry in status.get("checkpoints") or [] if isinstance(status, dict) else []:
            try:
                val_loss = entry.get("val_loss")
                found.append(Checkpoint(
                    checkpoint_id=str(entry["checkpoint_id"]), model=f"{job_id}/{CHECKPOINT_DIR}/{Path(entry['path']).name}",
                    step=int(entry["step"]),
                    epoch=int(entry["epoch"]) if entry.get("epoch") is not None else None,
                    metrics={"val_loss": float(val_loss)} if isinstance(val_loss, (int, float)) else {}))
            except (KeyError, TypeError, ValueError, AttributeError):
                logger.warning("local job %s: skipping an unreadable checkpoint entry %r", job_id, entry)
        return sorted(found, key=lambda c: c.step)

    def same_model(self, model: str, other: str) -> bool:
        """The same weights file content (the trainer copies its best checkpoint to `weights.npz`)."""
        if model == other:
            return True
        try:
            paths = [self.weights_file(m) for m in (model, other) if m != BASE_MODEL]
            return len(paths) == 2 and filecmp.cmp(*paths, shallow=False)
        except (ConfigError, OSError):  # not a readable tuned model: evaluating it says what is wrong
            return False

    def model_artifacts(self, model: str) -> dict[str, str]:
        return {MODEL_ARTIFACT: str(self.weights_file(model))}

    @classmethod
    def model_from_artifact(cls, path: str) -> tuple[str, dict[str, str]]:
        """A served version's weights are `<folder>/<job_id>/<file>.npz`: the same model id, in a jobs home of its
        own."""
        weights = Path(path)
        return f"{weights.parent.name}/{weights.name}", {"local.jobs_dir": str(weights.parent.parent)}

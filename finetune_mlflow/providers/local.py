"""The embedded default provider: trains the span ranker on this machine, shaped like a cloud tuning service.

A job is a directory (`<jobs_dir>/<job_id>/`) and a detached child process (`finetune_mlflow.local_trainer`)
that writes `status.json` (atomically replaced) and appends metric events to `events.jsonl`. The cursor for
`read_metrics` is a byte offset into that file, so a reader never sees an event twice and a rerun of `tune`
reattaches to a job that kept training while nobody watched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from finetune_mlflow import span_features, span_model
from finetune_mlflow.passage_cache import BoundedCache
from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError, ProviderError
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.providers.base import (
    JobState,
    MetricPoint,
    MetricsPage,
    Prediction,
    PreflightReport,
    TuningJob,
    TuningRequest,
)

logger = logging.getLogger(__name__)

BASE_MODEL = "span-ranker-base"
WEIGHTS_FILE = "weights.npz"
TRAINER_PID = "pid.json"  # written by the trainer that holds the job's lock
LAUNCHER_PID = "launch.json"  # written by start_job for the process it launched
TRAINER_LOCK = "trainer.lock"
PASSAGE_CACHE_ENTRIES = 256
PASSAGE_CACHE_BYTES = 64 << 20


def default_jobs_dir() -> Path:
    home = os.environ.get("FINETUNE_MLFLOW_HOME")
    return Path(home) / "local-jobs" if home else Path.home() / ".cache" / "finetune-mlflow" / "local-jobs"


WEIGHTS_FORMAT = 2  # 2: sparse span ranker (blocks of (features, 1 + question types)); 1 had no format key


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


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process with that pid
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class LocalProvider:
    name = "local"
    max_concurrency = 1  # in-process numpy model: threads would only contend for the GIL

    def __init__(self, config: Config):
        self.config = config
        self.jobs_dir = Path(config.local.jobs_dir) if config.local.jobs_dir else default_jobs_dir()
        # Featurized contexts for predict: questions about one context featurize it once; memory stays bounded.
        self.passage_cache = BoundedCache(span_features.passage, span_features.approx_bytes,
                                      PASSAGE_CACHE_ENTRIES, PASSAGE_CACHE_BYTES)

    def _job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def preflight(self, request: TuningRequest) -> PreflightReport:
        if request.base_model != BASE_MODEL:
            raise ConfigError(f"local provider: base_model {request.base_model!r} is unknown; the local provider "
                              f"trains {BASE_MODEL!r} (set tune.base_model or -P base_model={BASE_MODEL})")
        train = read_jsonl(request.prepared_dir / "train.jsonl")
        validation = read_jsonl(request.prepared_dir / "validation.jsonl")
        tokens = sum(approx_tokens(r["question"] + r["context"] + r["answers"][0]) for r in train)
        return PreflightReport(len(train), len(validation), tokens, tokens * request.epochs, 0.0)

    def _job_for_run(self, run_id: str) -> str | None:
        """A job this run already started (a crash between creating it and tagging the run leaves one behind)."""
        if not self.jobs_dir.exists():
            return None
        for spec_path in sorted(self.jobs_dir.glob("*/spec.json")):
            if json.loads(spec_path.read_text(encoding="utf-8")).get("run_id") == run_id:
                return spec_path.parent.name
        return None

    def start_job(self, request: TuningRequest) -> TuningJob:
        """Create the job directory and launch its trainer; a job this run already created is resumed instead."""
        job_id = self._job_for_run(request.run_id)
        if job_id:
            logger.info("run %s already created local job %s: adopting it", request.run_id, job_id)
        else:
            job_id = f"localjob-{uuid.uuid4().hex[:12]}"
            (self._job_dir(job_id)).mkdir(parents=True)
            write_json_atomic(self._job_dir(job_id) / "spec.json", {
                "job_id": job_id,
                "run_id": request.run_id,
                "train": str((request.prepared_dir / "train.jsonl").resolve()),
                "validation": str((request.prepared_dir / "validation.jsonl").resolve()),
                "epochs": request.epochs,
                "learning_rate": request.learning_rate,
                "batch_size": request.batch_size or 32,
                "seed": request.seed,
                "max_span_tokens": self.config.local.max_span_tokens,
                "eval_every_steps": self.config.local.eval_every_steps,
                "validation_loss_examples": self.config.local.validation_loss_examples,
            })
        job_dir = self._job_dir(job_id)
        # The trainer records its own pid once it holds the job's lock; until then nothing trains this job. A
        # launch that turns out redundant (a crash right after the previous one) finds the lock taken and exits.
        if not (job_dir / TRAINER_PID).exists():
            if not (job_dir / "status.json").exists():
                write_json_atomic(job_dir / "status.json", {"state": "pending", "updated": time.time()})
            with open(job_dir / "trainer.log", "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "finetune_mlflow.local_trainer", str(job_dir)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            write_json_atomic(job_dir / LAUNCHER_PID, {"pid": process.pid})
            logger.info("local job %s started (pid %d, dir %s)", job_id, process.pid, job_dir)
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> TuningJob:
        job_dir = self._job_dir(job_id)
        try:
            status = json.loads((job_dir / "status.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProviderError("local", f"job {job_id} not found under {self.jobs_dir}; was it started on this "
                                "machine with the same local.jobs_dir?", status=404) from None
        state = JobState(status["state"])
        if state in (JobState.PENDING, JobState.RUNNING):
            # The trainer's own pid once it runs; before that, the process launched to become it.
            pid_file = next((job_dir / name for name in (TRAINER_PID, LAUNCHER_PID) if (job_dir / name).exists()),
                            None)
            if pid_file is not None and not _pid_alive(json.loads(pid_file.read_text())["pid"]):
                # Re-read: the trainer may have written its final status just before exiting.
                status = json.loads((job_dir / "status.json").read_text(encoding="utf-8"))
                state = JobState(status["state"])
                if state in (JobState.PENDING, JobState.RUNNING):
                    return TuningJob(job_id, JobState.FAILED, "process_died", error_code="trainer_died",
                                     error_message=f"the trainer process exited without a final status; see "
                                                   f"{job_dir / 'trainer.log'}")
        return TuningJob(
            job_id=job_id, state=state, provider_status=status["state"],
            tuned_model=status.get("tuned_model"), error_code=status.get("error_code"),
            error_message=status.get("error_message"),
            tags={"local.job_dir": str(job_dir), **({"local.best_checkpoint": status["best_checkpoint"]}
                                                    if "best_checkpoint" in status else {})},
            metrics={k: float(v) for k, v in status.get("metrics", {}).items()},
        )

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's per-epoch checkpoints so far (each a usable `predict` model path), oldest first:
        `checkpoint_id`, `epoch`, `step`, `path`, `val_loss`, as the trainer lists them in status.json."""
        status = json.loads((self._job_dir(job_id) / "status.json").read_text(encoding="utf-8"))
        return list(status.get("checkpoints", []))

    def read_metrics(self, job_id: str, cursor: str | None) -> MetricsPage:
        path = self._job_dir(job_id) / "events.jsonl"
        offset = int(cursor or 0)
        if not path.exists():
            return MetricsPage([], cursor)
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written is read next time
        points = []
        for line in complete.splitlines():
            event = json.loads(line)
            points.append(MetricPoint(event["key"], float(event["value"]), int(event["step"]), int(event["ts"])))
        return MetricsPage(points, str(offset + len(complete)))

    def _model(self, model: str) -> tuple[span_model.Weights, dict[str, float], int]:
        if model == BASE_MODEL:
            size = self.config.local.max_span_tokens
            return span_model.initial_weights(size), {}, size
        if not Path(model).exists():
            raise ConfigError(f"local provider: model {model!r} is neither {BASE_MODEL!r} nor a weights file")
        return load_weights(str(Path(model).resolve()))

    def predict(self, model: str, question: str, context: str) -> Prediction:
        """An empty (or punctuation-only) context answers "" for its row instead of failing the batch."""
        weights, idf, size = self._model(model)
        started = time.monotonic()
        answer = span_model.answer(self.passage_cache.get(context), question, idf, weights, size)
        return Prediction(answer, (time.monotonic() - started) * 1000.0)

    def list_jobs(self) -> Iterator[str]:
        if self.jobs_dir.exists():
            yield from sorted(p.name for p in self.jobs_dir.iterdir() if (p / "status.json").exists())

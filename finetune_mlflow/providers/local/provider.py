"""The embedded default provider: trains the span ranker on this machine, shaped like a cloud tuning service.

A job is a directory (`<jobs_dir>/<job_id>/`) and a detached child process (`providers.local.trainer`)
that writes `status.json` (atomically replaced) and appends metric events to `events.jsonl`. The cursor for
`read_metrics` is a byte offset into that file, so a reader never sees an event twice and a rerun of `tune`
reattaches to a job that kept training while nobody watched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from finetune_mlflow.providers.local import span_model
from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.config import Config
from finetune_mlflow.errors import ConfigError, ProviderError
from finetune_mlflow.process import pid_alive
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.providers.base import (
    MODEL_ARTIFACT,
    ProviderBase,
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
RESTARTS = "restarts.json"  # how often a dead trainer was relaunched on this job
MAX_RESTARTS = 3  # a trainer that keeps dying (out of memory, a bug) is a failed job, not a loop


def default_jobs_dir() -> Path:
    home = os.environ.get("FINETUNE_MLFLOW_HOME")
    return Path(home) / "local-jobs" if home else Path.home() / ".cache" / "finetune-mlflow" / "local-jobs"


def save_weights(path: Path, weights: span_model.Weights, idf: dict[str, float], max_span_tokens: int) -> None:
    """Write to a temporary name and rename, so a reader never loads half a file."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **weights.arrays(), idf_words=np.array(list(idf), dtype=object).astype(str),
             idf_values=np.array(list(idf.values()), dtype=float), max_span_tokens=np.array(max_span_tokens))
    os.replace(tmp, path)


@lru_cache(maxsize=8)
def load_weights(path: str) -> tuple[span_model.Weights, dict[str, float], int]:
    with np.load(path) as data:
        weights = span_model.Weights(**{name: data[name] for name in span_model.Weights.__dataclass_fields__})
        idf = dict(zip(data["idf_words"].tolist(), data["idf_values"].tolist()))
        return weights, idf, int(data["max_span_tokens"])


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)


class LocalProvider(ProviderBase):
    name = "local"
    JOB_ID_PATTERN = re.compile(r"localjob-[0-9a-f]{12}")
    JOB_ID_EXAMPLE = "localjob- and 12 hex digits"
    max_concurrency = 1  # in-process numpy model: threads would only contend for the GIL
    max_parallel_jobs = os.cpu_count() or 1  # each job trains in its own process, one core each

    def __init__(self, config: Config):
        self.config = config
        self.jobs_dir = Path(config.local.jobs_dir) if config.local.jobs_dir else default_jobs_dir()

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
            n_train = len(read_jsonl(request.prepared_dir / "train.jsonl"))
            batch_size = request.batch_size or 32
            write_json_atomic(self._job_dir(job_id) / "spec.json", {
                "total_steps": request.epochs * math.ceil(n_train / batch_size),
                "job_id": job_id,
                "run_id": request.run_id,
                "train": str((request.prepared_dir / "train.jsonl").resolve()),
                "validation": str((request.prepared_dir / "validation.jsonl").resolve()),
                "epochs": request.epochs,
                "learning_rate": request.learning_rate,
                "batch_size": batch_size,
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
            self._launch_trainer(job_dir)
        return self.get_job(job_id)

    @staticmethod
    def _launch_trainer(job_dir: Path) -> int:
        """Start the job's trainer in its own session (its pid is its process group: `cancel` stops the group),
        importing this very package (whatever the working directory), so it writes what this code reads."""
        source_root = str(Path(__file__).resolve().parents[3])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))}
        with open(job_dir / "trainer.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "finetune_mlflow.providers.local.trainer", str(job_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
            )
        write_json_atomic(job_dir / LAUNCHER_PID, {"pid": process.pid})
        logger.info("local job %s: trainer started (pid %d, dir %s)", job_dir.name, process.pid, job_dir)
        return process.pid

    def _live_pid(self, job_dir: Path) -> int | None:
        """The pid of the process training (or about to train) the job, if one is alive."""
        for name in (TRAINER_PID, LAUNCHER_PID):
            try:
                pid = int(json.loads((job_dir / name).read_text(encoding="utf-8"))["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if pid_alive(pid):
                return pid
        return None

    def _restart(self, job_dir: Path) -> TuningJob | None:
        """Relaunch the trainer of a job whose trainer died without a final status (kill -9, a reboot), from
        scratch on the same job (the run's metric sink skips the steps it already holds); None once it has
        been relaunched MAX_RESTARTS times."""
        restarts = json.loads((job_dir / RESTARTS).read_text(encoding="utf-8"))["count"] \
            if (job_dir / RESTARTS).exists() else 0
        if restarts >= MAX_RESTARTS:
            return None
        write_json_atomic(job_dir / RESTARTS, {"count": restarts + 1})
        (job_dir / TRAINER_PID).unlink(missing_ok=True)
        write_json_atomic(job_dir / "status.json", {"state": "pending", "updated": time.time()})
        pid = self._launch_trainer(job_dir)
        logger.warning("local job %s: its trainer had died without a final status; restarted it from scratch "
                       "(pid %d, restart %d of %d)", job_dir.name, pid, restarts + 1, MAX_RESTARTS)
        return TuningJob(job_dir.name, JobState.PENDING, "restarted", base_model=BASE_MODEL,
                         tags={"local.job_dir": str(job_dir), "local.trainer_restarts": str(restarts + 1)},
                         **self._job_facts(job_dir))

    def cancel_job(self, job_id: str) -> TuningJob:
        """SIGTERM to the trainer's process group, then status `cancelled` (a job already ended stays as it is)."""
        job_dir = self._job_dir(self.check_job_id(job_id))
        pid = self._live_pid(job_dir)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        job = self.get_job(job_id, restart=False)
        if job.state in (JobState.PENDING, JobState.RUNNING) or job.error_code == "trainer_died":
            write_json_atomic(job_dir / "status.json", {"state": "cancelled", "updated": time.time(),
                                                        "error_message": "cancelled by finetune-mlflow cancel"})
            logger.info("local job %s cancelled%s", job_id, f" (trainer pid {pid} stopped)" if pid else "")
        return self.get_job(job_id, restart=False)

    def get_job(self, job_id: str, *, restart: bool = True) -> TuningJob:
        """The job's status; a trainer found dead without a final status is restarted (`restart`, at most
        MAX_RESTARTS times), else the job is FAILED with `trainer_died`."""
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
            if pid_file is not None and not pid_alive(json.loads(pid_file.read_text())["pid"]):
                # Re-read: the trainer may have written its final status just before exiting.
                status = json.loads((job_dir / "status.json").read_text(encoding="utf-8"))
                state = JobState(status["state"])
                if state in (JobState.PENDING, JobState.RUNNING):
                    restarted = self._restart(job_dir) if restart else None
                    if restarted is not None:
                        return restarted
                    return TuningJob(job_id, JobState.FAILED, "process_died", error_code="trainer_died",
                                     error_message=f"the trainer process exited without a final status; see "
                                                   f"{job_dir / 'trainer.log'}")
        return TuningJob(
            job_id=job_id, state=state, provider_status=status["state"],
            tuned_model=status.get("tuned_model"), error_code=status.get("error_code"),
            error_message=status.get("error_message"),
            tags={"local.job_dir": str(job_dir)},
            metrics={k: float(v) for k, v in status.get("metrics", {}).items()},
            base_model=BASE_MODEL, **self._job_facts(job_dir),
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
        weights, idf, size = self._model(model)
        started = time.monotonic()
        answer = span_model.predict_span(span_model.features(question, context, idf, size), weights)
        return Prediction(answer, (time.monotonic() - started) * 1000.0)

    def model_artifacts(self, model: str) -> dict[str, str]:
        return {MODEL_ARTIFACT: model}

    def list_jobs(self) -> Iterator[str]:
        if self.jobs_dir.exists():
            yield from sorted(p.name for p in self.jobs_dir.iterdir() if (p / "status.json").exists())

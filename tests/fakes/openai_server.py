"""An in-process fake of the OpenAI HTTP API (files, fine-tuning jobs, events, checkpoints, chat completions).

It speaks the documented JSON shapes so tests drive the real `openai` client against it:

    with FakeOpenAI() as server:                       # 127.0.0.1, free port, background thread
        server.script_next_job(JobScript(statuses=[...], n_steps=6))
        server.inject("/v1/chat/completions", status=429, retry_after="2")
        client = OpenAI(base_url=server.base_url, api_key="sk-test-x")

Jobs follow a scripted timeline: the create response shows `statuses[0]` and every
`GET /v1/fine_tuning/jobs/{id}` advances one entry (then stays on the last one). Metric events appear while the job
runs (spread over the running polls unless `metrics_visible` says otherwise); message events mark each status
change. Events are listed newest-first and `after` is an event-id cursor meaning "older than this event", as the
real API does; job and checkpoint lists are newest-first with the same kind of cursor.

Pausing: `POST .../jobs/{id}/pause` holds a running job at status "paused" (its timeline stops; a script may also
list "paused" polls, as a pause from the dashboard shows) until `POST .../resume` sets it running again.

Chat completions refuse the deprecated `max_tokens` for reasoning models (o-series, gpt-5*), as the API does: clients
send `max_completion_tokens`.

Faults: `inject(path, ...)` queues a rule matched against each request (first active rule wins) that answers
with an error status (optionally with `retry-after`), delays the response, or both; `times` limits how often it
fires, `fraction` makes it fire at random (seeded), `after_handling` processes the request first and then
answers with the error (a response lost after the server acted: the job exists but the client saw a 500).

Recording: `uploads`, `created_jobs` (request bodies of jobs created), `chat_requests`, `chat_usage` and `requests`
(method, path, query, status) for assertions like "exactly one job was created".
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fakes.loopback import RESET, LoopbackServer

TERMINAL = ("succeeded", "failed", "cancelled")

STATUS_ERRORS = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "permission_denied",
        "You do not have access to create fine-tuning jobs for this model.",
    ),
    404: ("invalid_request_error", "not_found", "Not found."),
    408: ("timeout", None, "Request timed out."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


@dataclass
class JobScript:
    """How one fine-tuning job behaves over polls."""

    statuses: list[str] = field(
        default_factory=lambda: ["validating_files", "queued", "running", "running", "running", "succeeded"]
    )
    # Metric events generated (steps 1..n_steps) unless `metric_data` gives the events' `data` explicitly.
    n_steps: int = 6
    metric_data: list[dict[str, Any]] | None = None
    # Cumulative number of metric events visible at each poll index (same length as statuses); default: spread
    # evenly over the running polls, all visible at success.
    metrics_visible: list[int] | None = None
    # Validation metrics every N steps (valid_loss/valid_mean_token_accuracy), full_valid_* on the last step.
    valid_every: int = 2
    full_valid: bool = True
    # For a failed job: {"code": ..., "message": ..., "param": ...}.
    error: dict[str, Any] | None = None
    trained_tokens: int = 12_345
    # "base64" (what the API serves today) or "plain" CSV.
    result_file_encoding: str = "base64"
    # Steps that get a checkpoint at success (default: as OpenAI keeps them, the end of each of the last three
    # epochs; the last one is the final model itself).
    checkpoint_steps: list[int] | None = None
    organization_id: str = "org-fake"

    def build_metric_data(self) -> list[dict[str, Any]]:
        if self.metric_data is not None:
            return [dict(d) for d in self.metric_data]
        out = []
        for step in range(1, self.n_steps + 1):
            data: dict[str, Any] = {
                "step": step,
                "train_loss": round(2.0 / step, 6),
                "train_mean_token_accuracy": round(0.5 + 0.4 * step / self.n_steps, 6),
                "total_steps": self.n_steps,
            }
            if self.valid_every and step % self.valid_every == 0:
                data["valid_loss"] = round(2.2 / step, 6)
                data["valid_mean_token_accuracy"] = round(0.45 + 0.4 * step / self.n_steps, 6)
            if self.full_valid and step == self.n_steps:
                data["full_valid_loss"] = round(2.1 / step, 6)
                data["full_valid_mean_token_accuracy"] = round(0.47 + 0.4 * step / self.n_steps, 6)
            out.append(data)
        return out


def epoch_end_steps(n_steps: int, n_epochs: int) -> list[int]:
    """The steps ending each of the last three epochs of a job of `n_steps` steps (OpenAI's checkpoints)."""
    if n_steps <= 0:
        return []
    epochs = max(1, n_epochs)
    return sorted({round(n_steps * e / epochs) for e in range(max(1, epochs - 2), epochs + 1)} - {0})


@dataclass
class Fault:
    path: str  # regex matched (re.match) against the request path, e.g. "/v1/chat/completions"
    method: str | None = None  # None: any method
    status: int | None = 500  # None: no error, only `delay_s`; loopback.RESET: drop the connection
    retry_after: str | None = None
    retry_after_ms: str | None = None
    delay_s: float = 0.0
    times: int | None = 1  # None: unlimited
    fraction: float | None = None  # fire with this probability (seeded RNG); None: always
    body: dict[str, Any] | None = None
    after_handling: bool = False
    fired: int = 0

    def active(self) -> bool:
        return self.times is None or self.fired < self.times


@dataclass
class _Job:
    obj: dict[str, Any]
    script: JobScript
    metric_data: list[dict[str, Any]]
    poll: int = 0
    metrics_emitted: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # chronological
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # chronological
    paused: bool = False  # held by the pause endpoint until resumed


class FakeOpenAI(LoopbackServer):
    def __init__(self, *, seed: int = 0, api_key_prefix: str = "sk-"):
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._ids = 0
        self._clock = 1_700_000_000
        self.api_key_prefix = api_key_prefix
        self.files: dict[str, dict[str, Any]] = {}
        self.file_contents: dict[str, bytes] = {}
        self.uploads: list[dict[str, Any]] = []
        self.jobs: dict[str, _Job] = {}
        self._job_order: list[str] = []  # creation order
        self.created_jobs: list[dict[str, Any]] = []
        self.chat_requests: list[dict[str, Any]] = []
        # (model, prompt_tokens, completion_tokens) of every chat answer, as its `usage` reported them.
        self.chat_usage: list[tuple[str, int, int]] = []
        self.requests: list[tuple[str, str, dict[str, list[str]], int]] = []
        self.faults: list[Fault] = []
        # Exceptions raised inside route handlers (answered as 500); tests may assert it stays empty.
        self.handler_errors: list[BaseException] = []
        self._scripts: list[JobScript] = []
        self.default_script = JobScript()
        # Caps the `limit` of job listings, so a test can make clients follow pagination with a few jobs.
        self.jobs_page_limit: int | None = None
        # Reply text for chat completions; default echoes a fixed answer.
        self.chat_responder: Callable[[dict[str, Any]], str] = lambda body: "fake answer"
        # Model id -> `shutdown_date` that `GET /v1/models/{id}` reports (ISO date); unlisted models report none.
        self.shutdown_dates: dict[str, str] = {}
        # Models that answer 404 `model_not_found` on chat completions and models.retrieve (shut down).
        self.retired_models: set[str] = set()
        self.deleted_files: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------------------------------ scripting

    def script_next_job(self, script: JobScript) -> None:
        """The next created job follows `script` (queued; jobs beyond the queue use `default_script`)."""
        with self._lock:
            self._scripts.append(script)

    def inject(self, path: str, *, status: int | None = 500, method: str | None = None, times: int | None = 1,
               retry_after: str | None = None, retry_after_ms: str | None = None, delay_s: float = 0.0,
               fraction: float | None = None, body: dict[str, Any] | None = None,
               after_handling: bool = False) -> Fault:
        fault = Fault(path=path, method=method, status=status, retry_after=retry_after,
                      retry_after_ms=retry_after_ms, delay_s=delay_s, times=times, fraction=fraction, body=body,
                      after_handling=after_handling)
        with self._lock:
            self.faults.append(fault)
        return fault

    def inject_sequence(self, path: str, statuses: list[int | None], *, method: str | None = None,
                        retry_after: str | None = None) -> None:
        """One fault per entry, fired in order on consecutive matching calls; None lets that call through."""
        for status in statuses:
            self.inject(path, status=status, method=method, times=1,
                        retry_after=retry_after if status == 429 else None)

    def deny_job_creation(self, message: str | None = None) -> Fault:
        """Every job creation answers 403, as for accounts no longer allowed to start self-serve fine-tuning."""
        body = None
        if message:
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": "permission_denied"}}
        return self.inject(r"/v1/fine_tuning/jobs$", method="POST", status=403, times=None, body=body)

    def close_fine_tuning(self) -> Fault:
        """Job creation answers 403 `training_not_available`, as after OpenAI closes self-serve fine-tuning."""
        return self.inject(r"/v1/fine_tuning/jobs$", method="POST", status=403, times=None, body={"error": {
            "message": "Fine-tuning is not available for your organization.", "type": "invalid_request_error",
            "param": None, "code": "training_not_available"}})

    def add_job(self, script: JobScript | None = None, *, model: str = "gpt-4o-mini-2024-07-18",
                suffix: str = "squad", metadata: dict[str, str] | None = None) -> str:
        """Create a job directly (no uploads, not counted in `created_jobs`), e.g. for list/sync tests."""
        training = self._store_file(b'{"messages": []}\n', "train.jsonl", "fine-tune")
        with self._lock:
            job = self._create_job({"model": model, "training_file": training["id"], "suffix": suffix,
                                    "metadata": metadata}, script or JobScript())
        return job.obj["id"]

    def advance(self, job_id: str, polls: int = 1) -> dict[str, Any]:
        """Advance a job's timeline as if it had been polled."""
        with self._lock:
            for _ in range(polls):
                self._advance(self.jobs[job_id])
            return dict(self.jobs[job_id].obj)

    def checkpoint_step(self, model: str) -> int | None:
        """The step of an intermediate checkpoint model (`ft:...:ckpt-step-N`), None for any other model (the
        final model included): lets a test's answerer give checkpoints their own quality."""
        with self._lock:
            for job in self.jobs.values():
                for checkpoint in job.checkpoints:
                    if checkpoint["fine_tuned_model_checkpoint"] == model != job.obj["fine_tuned_model"]:
                        return int(checkpoint["step_number"])
        return None

    def events_of(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of a job so far, oldest first (what the API would page through newest-first)."""
        with self._lock:
            return [dict(e) for e in self.jobs[job_id].events]

    def metric_events_of(self, job_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events_of(job_id) if e["type"] == "metrics"]

    # ------------------------------------------------------------------------------------------ internals

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return prefix + "".join(self._rng.choice(alphabet) for _ in range(20)) + f"{self._ids:04d}"

    def _now(self) -> int:
        self._clock += 7
        return self._clock

    def _store_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        with self._lock:
            file_id = self._new_id("file-")
            obj = {"id": file_id, "object": "file", "bytes": len(content), "created_at": self._now(),
                   "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
                   "status_details": None}
            self.files[file_id] = obj
            self.file_contents[file_id] = content
            return obj

    def _add_event(self, job: _Job, message: str, *, level: str = "info", type_: str = "message",
                   data: dict[str, Any] | None = None) -> None:
        job.events.append({"object": "fine_tuning.job.event", "id": self._new_id("ftevent-"),
                           "created_at": self._now(), "level": level, "message": message,
                           "data": data or {}, "type": type_})

    def _create_job(self, body: dict[str, Any], script: JobScript) -> _Job:
        job_id = self._new_id("ftjob-")
        method = body.get("method") or {}
        hp_in = dict(((method.get("supervised") or {}).get("hyperparameters")) or body.get("hyperparameters") or {})
        metric_data = script.build_metric_data()
        hp = {
            "n_epochs": hp_in.get("n_epochs", "auto") if hp_in.get("n_epochs", "auto") != "auto" else 3,
            "batch_size": hp_in.get("batch_size", "auto") if hp_in.get("batch_size", "auto") != "auto" else 1,
            "learning_rate_multiplier": (hp_in.get("learning_rate_multiplier", "auto")
                                         if hp_in.get("learning_rate_multiplier", "auto") != "auto" else 1.8),
        }
        obj = {
            "object": "fine_tuning.job",
            "id": job_id,
            "model": body["model"],
            "created_at": self._now(),
            "finished_at": None,
            "fine_tuned_model": None,
            "organization_id": script.organization_id,
            "result_files": [],
            "status": script.statuses[0],
            "validation_file": body.get("validation_file"),
            "training_file": body["training_file"],
            "hyperparameters": dict(hp),
            "trained_tokens": None,
            "error": None,
            "user_provided_suffix": body.get("suffix"),
            "seed": body.get("seed") if body.get("seed") is not None else 42,
            "estimated_finish": None,
            "integrations": [],
            "metadata": body.get("metadata"),
            "method": {"type": method.get("type", "supervised"), "supervised": {"hyperparameters": dict(hp)}},
        }
        job = _Job(obj=obj, script=script, metric_data=metric_data)
        self.jobs[job_id] = job
        self._job_order.append(job_id)
        self._add_event(job, f"Created fine-tuning job: {job_id}")
        self._enter_status(job, None, obj["status"])
        self._reveal_metrics(job)
        return job

    def _visible_target(self, job: _Job) -> int:
        script, n = job.script, len(job.metric_data)
        if script.metrics_visible is not None:
            return min(n, script.metrics_visible[min(job.poll, len(script.metrics_visible) - 1)])
        status = script.statuses[job.poll]
        if status == "succeeded":
            return n
        running_polls = [i for i, s in enumerate(script.statuses) if s == "running"]
        if not running_polls:
            return job.metrics_emitted
        done = sum(1 for i in running_polls if i <= job.poll)
        return min(n, math.ceil(done * n / len(running_polls)))

    def _reveal_metrics(self, job: _Job) -> None:
        total = len(job.metric_data)
        target = max(job.metrics_emitted, self._visible_target(job))
        while job.metrics_emitted < target:
            data = job.metric_data[job.metrics_emitted]
            message = f"Step {data.get('step')}/{total}: training loss={data.get('train_loss')}"
            if data.get("valid_loss") is not None:
                message += f", validation loss={data['valid_loss']}"
            self._add_event(job, message, type_="metrics", data=data)
            job.metrics_emitted += 1

    def _enter_status(self, job: _Job, old: str | None, new: str) -> None:
        obj = job.obj
        if old == new:
            return
        obj["status"] = new
        if new == "validating_files":
            self._add_event(job, f"Validating training file: {obj['training_file']}")
        elif new == "queued":
            self._add_event(job, "Files validated, moving job to queued state")
        elif new == "running":
            self._add_event(job, "Fine-tuning job started")
            obj["estimated_finish"] = self._clock + 600
        elif new == "succeeded":
            self._reveal_metrics(job)
            self._finish_success(job)
        elif new == "failed":
            error = job.script.error or {"code": "invalid_training_file", "message": "The job failed.",
                                         "param": "training_file"}
            obj["error"] = {"code": error.get("code"), "message": error.get("message"), "param": error.get("param")}
            obj["finished_at"] = self._now()
            self._add_event(job, f"Fine-tuning job failed: {error.get('message')}", level="error")
        elif new == "cancelled":
            obj["finished_at"] = self._now()
            self._add_event(job, "Fine-tuning job cancelled")
        elif new == "paused":
            self._add_event(job, "Fine-tuning job paused")

    def _finish_success(self, job: _Job) -> None:
        obj, script = job.obj, job.script
        suffix = obj.get("user_provided_suffix") or ""
        obj["fine_tuned_model"] = f"ft:{obj['model']}:{script.organization_id.removeprefix('org-')}:{suffix}:{obj['id'][-8:]}"
        obj["trained_tokens"] = script.trained_tokens
        obj["finished_at"] = self._now()
        obj["estimated_finish"] = None
        steps = [int(d["step"]) for d in job.metric_data if "step" in d]
        ckpt_steps = script.checkpoint_steps if script.checkpoint_steps is not None else epoch_end_steps(
            max(steps, default=0), int(obj["hyperparameters"]["n_epochs"]))
        by_step = {int(d["step"]): d for d in job.metric_data if "step" in d}
        for step in ckpt_steps:
            model_name = obj["fine_tuned_model"]
            if step != (steps[-1] if steps else None):
                model_name = f"{model_name}:ckpt-step-{step}"
            metrics = {k: v for k, v in by_step.get(step, {"step": step}).items() if k != "total_steps"}
            job.checkpoints.append({"object": "fine_tuning.job.checkpoint", "id": self._new_id("ftckpt_"),
                                    "created_at": self._now(), "fine_tuned_model_checkpoint": model_name,
                                    "fine_tuning_job_id": obj["id"], "metrics": metrics, "step_number": step})
        columns = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        if any("full_valid_loss" in d for d in job.metric_data):
            columns += ["full_valid_loss", "full_valid_mean_token_accuracy"]
        rows = [",".join(columns)]
        for d in job.metric_data:
            row = dict(d, train_accuracy=d.get("train_mean_token_accuracy"))
            rows.append(",".join("" if row.get(c) is None else str(row.get(c)) for c in columns))
        csv_bytes = ("\n".join(rows) + "\n").encode()
        content = base64.b64encode(csv_bytes) if script.result_file_encoding == "base64" else csv_bytes
        result = self._store_file(content, "step_metrics.csv", "fine-tune-results")
        obj["result_files"] = [result["id"]]
        self._add_event(job, f"New fine-tuned model created: {obj['fine_tuned_model']}")
        self._add_event(job, "The job has successfully completed")

    def _advance(self, job: _Job) -> None:
        if job.obj["status"] in TERMINAL or job.paused:
            return
        old = job.obj["status"]
        job.poll = min(job.poll + 1, len(job.script.statuses) - 1)
        new = job.script.statuses[job.poll]
        if new != "succeeded":
            self._reveal_metrics(job)
        self._enter_status(job, old, new)

    def _match_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if not fault.active():
                    continue
                if fault.method and fault.method.upper() != method:
                    continue
                if not re.match(fault.path, path):
                    continue
                if fault.fraction is not None and self._rng.random() >= fault.fraction:
                    continue
                fault.fired += 1
                return fault
        return None

    # ------------------------------------------------------------------------------------------ routes

    def respond(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Faults first (delay, error before or after the work), then the route; every request is recorded."""
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        with self._lock:
            request_no = len(self.requests) + 1
        fault = self._match_fault(method, path)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status == RESET and not fault.after_handling:
            return RESET, {}, b""
        if fault is not None and fault.status is not None and not fault.after_handling:
            status, payload, extra = self._error(fault.status)
        else:
            try:
                status, payload, extra = self.handle(method, path, query, headers, body)
            except Exception as e:  # noqa: BLE001 - a bug in the fake must surface as an answer, not a hang
                self.handler_errors.append(e)
                status, payload, extra = self._error(500, f"fake server bug: {e!r}")
            if fault is not None and fault.status == RESET:  # after_handling: the work is done, no answer
                return RESET, {}, b""
            if fault is not None and fault.status is not None:  # after_handling: the work is done, answer fails
                status, payload, extra = self._error(fault.status)
        extra = {**extra, "x-request-id": f"req_fake{request_no:06d}"}
        if fault is not None and fault.status is not None:
            if fault.body is not None:
                payload = fault.body
            if fault.retry_after is not None:
                extra["retry-after"] = fault.retry_after
            if fault.retry_after_ms is not None:
                extra["retry-after-ms"] = fault.retry_after_ms
        with self._lock:
            self.requests.append((method, path, query, status))
        if isinstance(payload, bytes):
            return status, {"Content-Type": "application/octet-stream", **extra}, payload
        return status, {"Content-Type": "application/json", **extra}, json.dumps(payload).encode()

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any,
               body: bytes) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer " + self.api_key_prefix):
            return self._error(401)
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("POST", r"/v1/files$", self._post_file),
            ("GET", r"/v1/files/(?P<file_id>[^/]+)/content$", self._get_file_content),
            ("GET", r"/v1/files/(?P<file_id>[^/]+)$", self._get_file),
            ("POST", r"/v1/fine_tuning/jobs$", self._post_job),
            ("GET", r"/v1/fine_tuning/jobs$", self._list_jobs),
            ("GET", r"/v1/fine_tuning/jobs/(?P<job_id>[^/]+)$", self._get_job),
            ("POST", r"/v1/fine_tuning/jobs/(?P<job_id>[^/]+)/cancel$", self._cancel_job),
            ("POST", r"/v1/fine_tuning/jobs/(?P<job_id>[^/]+)/pause$", self._pause_job),
            ("POST", r"/v1/fine_tuning/jobs/(?P<job_id>[^/]+)/resume$", self._resume_job),
            ("GET", r"/v1/fine_tuning/jobs/(?P<job_id>[^/]+)/events$", self._list_events),
            ("GET", r"/v1/fine_tuning/jobs/(?P<job_id>[^/]+)/checkpoints$", self._list_checkpoints),
            ("POST", r"/v1/chat/completions$", self._chat),
            ("GET", r"/v1/models/(?P<model_id>[^/]+)$", self._get_model),
            ("DELETE", r"/v1/files/(?P<file_id>[^/]+)$", self._delete_file),
        ]
        for route_method, pattern, func in routes:
            m = re.match(pattern, path)
            if m and route_method == method:
                with self._lock:
                    return func(query=query, headers=headers, body=body, **m.groupdict())
        return self._error(404, f"Unknown route {method} {path}")

    @staticmethod
    def _error(status: int, message: str | None = None, *, code: str | None = None,
               param: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        type_, default_code, default_message = STATUS_ERRORS.get(status, ("api_error", None, "Error."))
        return status, {"error": {"message": message or default_message, "type": type_, "param": param,
                                  "code": code or default_code}}, {}

    @staticmethod
    def _page(items: list[dict[str, Any]], query: dict[str, list[str]], default_limit: int = 20
              ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Cursor page over `items` (already in listing order): `after` = id of the last item already seen."""
        limit = int((query.get("limit") or [default_limit])[0])
        after = (query.get("after") or [None])[0]
        start = 0
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                return FakeOpenAI._error(400, f"Invalid 'after': {after} not found", param="after")
            start = ids.index(after) + 1
        chunk = items[start:start + limit]
        return 200, {"object": "list", "data": chunk, "has_more": start + limit < len(items)}, {}

    def _post_file(self, query, headers, body):
        content_type = headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/form-data"):
            return self._error(400, "Expected multipart/form-data")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
        )
        fields: dict[str, Any] = {}
        filename = "upload"
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if part.get_filename():
                filename = part.get_filename()
            fields[name] = payload
        if "file" not in fields:
            return self._error(400, "Missing file", param="file")
        purpose = (fields.get("purpose") or b"").decode()
        if purpose not in ("fine-tune", "batch", "assistants", "vision", "user_data"):
            return self._error(400, f"Invalid purpose {purpose!r}", param="purpose")
        obj = self._store_file(fields["file"], filename, purpose)
        self.uploads.append({**obj, "content": fields["file"]})
        return 200, obj, {}

    def _get_file(self, query, headers, body, file_id):
        if file_id not in self.files:
            return self._error(404, f"No such File object: {file_id}", param="id")
        return 200, self.files[file_id], {}

    def _get_file_content(self, query, headers, body, file_id):
        if file_id not in self.file_contents:
            return self._error(404, f"No such File object: {file_id}", param="id")
        return 200, self.file_contents[file_id], {}

    def _post_job(self, query, headers, body):
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return self._error(400, "Invalid JSON body")
        for key in ("model", "training_file"):
            if not payload.get(key):
                return self._error(400, f"Missing required parameter: '{key}'.", param=key)
        for key in ("training_file", "validation_file"):
            file_id = payload.get(key)
            if file_id and file_id not in self.files:
                return self._error(400, f"invalid {key}: {file_id}", param=key, code="invalid_file")
        script = self._scripts.pop(0) if self._scripts else self.default_script
        job = self._create_job(payload, script)
        self.created_jobs.append(payload)
        return 200, dict(job.obj), {}

    def _listed_jobs(self, query) -> list[dict[str, Any]]:
        jobs = [self.jobs[j].obj for j in reversed(self._job_order)]  # newest first
        for key, values in query.items():
            m = re.fullmatch(r"metadata\[(.+)\]", key)
            if m:
                jobs = [j for j in jobs if (j.get("metadata") or {}).get(m.group(1)) == values[0]]
        return jobs

    def _list_jobs(self, query, headers, body):
        if self.jobs_page_limit:
            limit = min(int((query.get("limit") or [20])[0]), self.jobs_page_limit)
            query = {**query, "limit": [str(limit)]}
        return self._page(self._listed_jobs(query), query)

    def _job_or_404(self, job_id):
        if job_id not in self.jobs:
            return None, self._error(404, f"Could not find fine-tune: {job_id}", param="fine_tune_id",
                                     code="fine_tune_not_found")
        return self.jobs[job_id], None

    def _get_job(self, query, headers, body, job_id):
        job, error = self._job_or_404(job_id)
        if error:
            return error
        self._advance(job)
        return 200, dict(job.obj), {}

    def _cancel_job(self, query, headers, body, job_id):
        job, error = self._job_or_404(job_id)
        if error:
            return error
        if job.obj["status"] in TERMINAL:
            return self._error(400, f"Job {job_id} has already {job.obj['status']}")
        self._enter_status(job, job.obj["status"], "cancelled")
        return 200, dict(job.obj), {}

    def _pause_job(self, query, headers, body, job_id):
        job, error = self._job_or_404(job_id)
        if error:
            return error
        if job.obj["status"] != "running":
            return self._error(400, f"Job {job_id} is {job.obj['status']}; only a running job can be paused")
        job.paused = True
        self._enter_status(job, "running", "paused")
        return 200, dict(job.obj), {}

    def _resume_job(self, query, headers, body, job_id):
        job, error = self._job_or_404(job_id)
        if error:
            return error
        if job.obj["status"] != "paused":
            return self._error(400, f"Job {job_id} is {job.obj['status']}; only a paused job can be resumed")
        job.paused = False
        self._enter_status(job, "paused", "running")
        return 200, dict(job.obj), {}

    def _list_events(self, query, headers, body, job_id):
        job, error = self._job_or_404(job_id)
        if error:
            return error
        return self._page(list(reversed(job.events)), query)

    def _list_checkpoints(self, query, headers, body, job_id):
        job, error = self._job_or_404(job_id)
        if error:
            return error
        status, page, hdrs = self._page(list(reversed(job.checkpoints)), query, default_limit=10)
        if status == 200:
            page["first_id"] = page["data"][0]["id"] if page["data"] else None
            page["last_id"] = page["data"][-1]["id"] if page["data"] else None
        return status, page, hdrs

    def _chat(self, query, headers, body):
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return self._error(400, "Invalid JSON body")
        if not payload.get("model") or not payload.get("messages"):
            return self._error(400, "model and messages are required")
        if payload["model"] in self.retired_models:
            return self._error(404, f"The model `{payload['model']}` does not exist or you do not have access to it.",
                               code="model_not_found")
        if "max_tokens" in payload and re.match(r"(o\d|gpt-5)", payload["model"]):
            return self._error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                                    "'max_completion_tokens' instead.", param="max_tokens")
        self.chat_requests.append(payload)
        text = self.chat_responder(payload)
        prompt_chars = sum(len(m.get("content") or "") for m in payload["messages"])
        prompt_tokens = max(1, prompt_chars // 4) + 4 * len(payload["messages"])
        completion_tokens = max(1, len(text) // 4)
        self.chat_usage.append((payload["model"], prompt_tokens, completion_tokens))
        return 200, {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": self._now(),
            "model": payload["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": "fp_fake",
        }, {}

    def _get_model(self, query, headers, body, model_id):
        model_id = unquote(model_id)
        if model_id in self.retired_models:
            return self._error(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                               code="model_not_found")
        owner = "user-fake" if model_id.startswith("ft:") else "system"
        return 200, {"id": model_id, "object": "model", "created": self._now(), "owned_by": owner,
                     "shutdown_date": self.shutdown_dates.get(model_id)}, {}

    def _delete_file(self, query, headers, body, file_id):
        if self.files.pop(file_id, None) is None:
            return self._error(404, f"No such File object: {file_id}", param="id")
        self.file_contents.pop(file_id, None)
        self.deleted_files.append(file_id)
        return 200, {"id": file_id, "object": "file", "deleted": True}, {}

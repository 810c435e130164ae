"""An in-process fake of the Together AI HTTP API, written from the `together` 3.1.1 SDK's own types, so tests
drive the real `together.Together` client against it:

    with FakeTogether() as server:                       # 127.0.0.1, free port, background thread
        server.script_next_job(JobScript(statuses=[...], n_steps=12))
        server.inject(r"/v1/chat/completions", status=429, retry_after="1")
        client = Together(base_url=server.base_url, api_key="tgp-test")

Routes (paths as the SDK calls them): files (`POST /v1/files` answers 302 with `Location` and
`X-Together-File-Id`, the SDK PUTs the bytes there, then `POST /v1/files/{id}/preprocess`), fine-tunes
(`POST /v1/fine-tunes`, `GET /v1/fine-tunes` with every job at once, `GET /v1/fine-tunes/{id}`,
`POST .../cancel`, `GET .../events`, `GET .../metrics?global_step_from=`, `GET .../checkpoints`,
`GET /v1/fine-tunes/models/limits`, `POST /v1/fine-tunes/estimate-price`), `POST /v1/chat/completions` and the
model catalog `GET /v2/supported-models` (cursor pages, `search`).

Jobs follow a scripted timeline: each `GET /v1/fine-tunes/{id}` advances one status (then stays on the last).
Metric rows (a `train/*` row per step, an `eval/*` row every `eval_every` steps, written after it) appear while
the job runs, spread over the running polls; a failed job gets a `job_error` event with the script's message.
Faults (`inject`) are the OpenAI fake's `Fault` rules: an error status (with or without Retry-After), a delay,
or a dropped connection (`RESET`), optionally after the request was handled.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from tests.fakes.loopback import RESET, LoopbackServer
from tests.fakes.openai_server import Fault

TERMINAL = ("completed", "error", "user_error", "cancelled")
ACCOUNT = "fake-account"


@dataclass
class JobScript:
    statuses: list[str] = field(default_factory=lambda: ["pending", "queued", "running", "running", "running",
                                                         "uploading", "completed"])
    n_steps: int = 8
    eval_every: int = 2
    checkpoint_steps: list[int] | None = None  # default: n_checkpoints spread evenly, the last step included
    error_message: str = "The job failed."
    token_count: int = 23_456
    total_price: int = 1_250_000_000  # nanodollars, as the API reports it


@dataclass
class _Job:
    obj: dict[str, Any]
    script: JobScript
    rows: list[dict[str, float]]
    poll: int = 0
    visible: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def catalog_entry(name: str, status: str = "SUPPORTED_MODEL_STATUS_SUPPORTED",
                  products: tuple[str, ...] = ("PRODUCT_SERVERLESS", "PRODUCT_FINE_TUNING")) -> dict[str, Any]:
    """One model as the SDK's SupportedModel describes it (camelCase on the wire)."""
    now = "2026-11-01T00:00:00Z"
    return {"id": f"sm-{uuid.uuid4().hex[:12]}", "name": name, "baseModel": "", "baseModelId": "",
            "capabilities": ["CAPABILITY_CHAT"], "createdAt": now, "updatedAt": now, "deploymentProfiles": [],
            "displayName": name.rsplit("/", 1)[-1], "displayType": "chat", "inputModalities": ["MODALITY_TEXT"],
            "outputModalities": ["MODALITY_TEXT"], "products": list(products), "publisher": name.split("/")[0],
            "status": status}


def model_limits(model: str) -> dict[str, Any]:
    """Limits shaped like the SDK's FinetuneModelLimits (values in the range Together reports for 8B models)."""
    return {"model_name": model, "default_gradient_accumulation_steps": 1, "max_learning_rate": 1.0,
            "min_learning_rate": 1e-8, "max_num_checkpoints": 10, "max_num_epochs": 20, "max_num_evals": 100,
            "max_seq_length_sft": 8192, "max_seq_length_dpo": 8192, "min_max_seq_length": 512,
            "merge_output_lora": True, "supports_full_training": True, "supports_reasoning": False,
            "supports_tools": True, "supports_vision": False,
            "lora_training": {"default_rank": 8, "max_batch_size": 64, "max_batch_size_dpo": 32, "max_rank": 64,
                              "min_batch_size": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "up_proj", "down_proj", "gate_proj"]},
            "full_training": {"max_batch_size": 32, "max_batch_size_dpo": 16, "min_batch_size": 8}}


class FakeTogether(LoopbackServer):
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clock = 1_760_000_000
        self.files: dict[str, dict[str, Any]] = {}
        self.file_contents: dict[str, bytes] = {}
        self.jobs: dict[str, _Job] = {}
        self.created_jobs: list[dict[str, Any]] = []
        self.estimates: list[dict[str, Any]] = []
        self.chat_requests: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, int]] = []
        self.faults: list[Fault] = []
        self.handler_errors: list[BaseException] = []
        self._scripts: list[JobScript] = []
        self.default_script = JobScript()
        self.estimated_price: float | None = 3.5  # None: estimation unavailable
        self.allowed_to_proceed = True
        self.chat_responder: Callable[[dict[str, Any]], str] = lambda body: "fake answer"
        self.api_key_prefix = "tgp-"
        # The model catalog (`GET /v2/supported-models`), served `catalog_page_size` entries a page.
        self.catalog: list[dict[str, Any]] = []
        self.catalog_page_size = 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------------------------ scripting

    def script_next_job(self, script: JobScript) -> None:
        with self._lock:
            self._scripts.append(script)

    def inject(self, path: str, *, status: int | None = 500, method: str | None = None, times: int | None = 1,
               retry_after: str | None = None, delay_s: float = 0.0, after_handling: bool = False) -> Fault:
        fault = Fault(path=path, method=method, status=status, retry_after=retry_after, delay_s=delay_s,
                      times=times, after_handling=after_handling)
        with self._lock:
            self.faults.append(fault)
        return fault

    def add_job(self, script: JobScript | None = None, *, model: str = "meta-llama/Meta-Llama-3.1-8B-Instruct-"
                "Reference", suffix: str = "squad") -> str:
        """A job created directly (no uploads, not in `created_jobs`), e.g. for sync tests."""
        with self._lock:
            file_id = self._store(b'{"messages": []}\n', "train.jsonl")["id"]
            return self._create({"model": model, "training_file": file_id, "suffix": suffix, "n_epochs": 2,
                                 "learning_rate": 1e-4, "batch_size": 8, "n_checkpoints": 3},
                                script or JobScript()).obj["id"]

    def advance(self, job_id: str, polls: int = 1) -> dict[str, Any]:
        with self._lock:
            for _ in range(polls):
                self._advance(self.jobs[job_id])
            return dict(self.jobs[job_id].obj)

    def served_points(self, job_id: str) -> dict[str, list[tuple[int, float]]]:
        """Every loss the job has, by shared key, in step order (what a run must hold once it ends)."""
        out: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
        for row in self.jobs[job_id].rows:
            if "train/loss" in row:
                out["train_loss"].append((int(row["train/global_step"]), row["train/loss"]))
            if "eval/loss" in row:
                out["val_loss"].append((int(row["eval/global_step"]), row["eval/loss"]))
        return out

    def checkpoint_step(self, model: str) -> int | None:
        """The step of an intermediate checkpoint model, None for any other (the final model included)."""
        with self._lock:
            for job in self.jobs.values():
                for ckpt in job.checkpoints:
                    if ckpt.get("object_name") == model != job.obj["model_output_name"]:
                        return int(ckpt["step"])
        return None

    def is_tuned(self, model: str) -> bool:
        with self._lock:
            return any(model in (j.obj["model_output_name"], *[c.get("object_name") for c in j.checkpoints])
                       for j in self.jobs.values())

    # ------------------------------------------------------------------------------------------ internals

    def _now(self) -> str:
        self._clock += 7
        return dt.datetime.fromtimestamp(self._clock, dt.timezone.utc).isoformat().replace("+00:00", "Z")

    def _store(self, content: bytes, name: str) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4()}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": self._clock,
                               "filename": name, "FileType": "jsonl", "purpose": "fine-tune",
                               "processing_status": "COMPLETED"}
        self.file_contents[file_id] = content
        return self.files[file_id]

    def _event(self, job: _Job, type_: str, message: str, level: str = "info", **extra: Any) -> None:
        job.events.append({"object": "fine-tune-event", "created_at": self._now(), "type": type_,
                           "message": message, "level": level, **extra})

    def _create(self, body: dict[str, Any], script: JobScript) -> _Job:
        job_id = f"ft-{uuid.uuid4()}"
        suffix = body.get("suffix") or ""
        rows: list[dict[str, float]] = []
        for step in range(1, script.n_steps + 1):
            rows.append({"train/loss": round(2.0 / step, 6), "train/learning_rate": 1e-4,
                         "train/global_step": float(step)})
            if body.get("validation_file") and script.eval_every and step % script.eval_every == 0:
                rows.append({"eval/loss": round(2.2 / step, 6), "eval/global_step": float(step)})
        now = self._now()
        training_type = body.get("training_type") or {"type": "Lora", "lora_r": 8, "lora_alpha": 16}
        obj = {"id": job_id, "status": script.statuses[0], "user_id": ACCOUNT, "created_at": now,
               "updated_at": now, "model": body["model"], "training_file": body["training_file"],
               "validation_file": body.get("validation_file"), "n_epochs": body.get("n_epochs", 1),
               "n_evals": body.get("n_evals"), "n_checkpoints": body.get("n_checkpoints", 1),
               "learning_rate": body.get("learning_rate"),
               "batch_size": body.get("batch_size") if isinstance(body.get("batch_size"), int) else 64,
               "suffix": suffix or None, "training_type": training_type,
               "training_method": body.get("training_method") or {"method": "sft", "train_on_inputs": "auto"},
               # The API reference's example shape: "mynamespace/meta-llama/Llama-2-7b-hf-32162631".
               "model_output_name": f"{ACCOUNT}/{body['model']}-{suffix}-{job_id[3:11]}", "adapter_output_name": None,
               "token_count": None, "total_price": None, "steps_completed": 0, "total_steps": script.n_steps,
               "epochs_completed": 0, "events": []}
        job = _Job(obj=obj, script=script, rows=rows)
        self.jobs[job_id] = job
        self._event(job, "job_pending", "Fine-tune request created")
        return job

    def _advance(self, job: _Job) -> None:
        obj = job.obj
        if obj["status"] in TERMINAL:
            return
        job.poll = min(job.poll + 1, len(job.script.statuses) - 1)
        new, statuses = job.script.statuses[job.poll], job.script.statuses
        running = [i for i, s in enumerate(statuses) if s == "running"]
        if new == "running" or new in ("compressing", "uploading", "completed"):
            done = len([i for i in running if i <= job.poll])
            job.visible = len(job.rows) if new != "running" or not running else round(
                len(job.rows) * done / len(running))
            steps = [int(r["train/global_step"]) for r in job.rows[:job.visible] if "train/global_step" in r]
            obj["steps_completed"] = max(steps, default=0)
        if new != obj["status"]:
            obj["status"] = new
            obj["updated_at"] = self._now()
            if new == "running":
                obj["token_count"] = job.script.token_count
                self._event(job, "training_start", "Training started", token_count=job.script.token_count,
                            total_steps=job.script.n_steps)
            elif new == "completed":
                obj["total_price"] = job.script.total_price
                self._finish(job)
            elif new in ("error", "user_error"):
                self._event(job, "job_error", job.script.error_message, level="error")

    def _finish(self, job: _Job) -> None:
        obj, script = job.obj, job.script
        n = int(obj.get("n_checkpoints") or 1)
        steps = script.checkpoint_steps or sorted({round(script.n_steps * k / n) for k in range(1, n + 1)} - {0})
        for step in steps:
            final = step == script.n_steps
            name = obj["model_output_name"] if final else f"{obj['model_output_name']}-step-{step}"
            job.checkpoints.append({"checkpoint_type": "Final" if final else f"Intermediate (step {step})",
                                    "created_at": self._now(), "path": f"s3://fake/{obj['id']}/{step}",
                                    "step": step, "checkpoint": "adapter", "object_name": name})
        obj["epochs_completed"] = obj["n_epochs"]
        self._event(job, "job_complete", f"Fine-tuning done: {obj['model_output_name']}")

    def _match_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.active() and (not fault.method or fault.method == method) and re.match(fault.path, path):
                    fault.fired += 1
                    return fault
        return None

    # ------------------------------------------------------------------------------------------ routes

    def respond(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        fault = self._match_fault(method, path)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status is not None and not fault.after_handling:
            status, payload, extra = (RESET, {}, {}) if fault.status == RESET else self._error(fault.status)
        else:
            try:
                with self._lock:
                    status, payload, extra = self.handle(method, path, query, headers, body)
            except Exception as e:  # noqa: BLE001 - a bug in the fake must surface as an answer, not a hang
                self.handler_errors.append(e)
                status, payload, extra = self._error(500, f"fake server bug: {e!r}")
            if fault is not None and fault.status is not None:
                status, payload, extra = (RESET, {}, {}) if fault.status == RESET else self._error(fault.status)
        with self._lock:
            self.requests.append((method, path, status))
        if status == RESET:
            return RESET, {}, b""
        if fault is not None and fault.retry_after is not None:
            extra = {**extra, "retry-after": fault.retry_after}
        extra = {"x-request-id": f"req-{len(self.requests):06d}", **extra}
        return status, {"Content-Type": "application/json", **extra}, json.dumps(payload).encode()

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes):
        if method == "PUT" and path.startswith("/upload/"):  # the signed-URL upload: no API key on it
            return self._put_upload(path.rsplit("/", 1)[-1], body)
        if not (headers.get("Authorization") or "").startswith("Bearer " + self.api_key_prefix):
            return self._error(401, "Invalid API key provided")
        routes = [
            ("POST", r"/v1/files$", self._post_file),
            ("POST", r"/v1/files/(?P<file_id>[^/]+)/preprocess$", self._preprocess),
            ("GET", r"/v1/fine-tunes/models/limits$", self._limits),
            ("POST", r"/v1/fine-tunes/estimate-price$", self._estimate),
            ("POST", r"/v1/fine-tunes$", self._post_job),
            ("GET", r"/v1/fine-tunes$", self._list_jobs),
            ("GET", r"/v1/fine-tunes/(?P<job_id>ft-[^/]+)$", self._get_job),
            ("POST", r"/v1/fine-tunes/(?P<job_id>ft-[^/]+)/cancel$", self._cancel),
            ("GET", r"/v1/fine-tunes/(?P<job_id>ft-[^/]+)/events$", self._events),
            ("GET", r"/v1/fine-tunes/(?P<job_id>ft-[^/]+)/metrics$", self._metrics),
            ("GET", r"/v1/fine-tunes/(?P<job_id>ft-[^/]+)/checkpoints$", self._checkpoints),
            ("POST", r"/v1/chat/completions$", self._chat),
            ("GET", r"/v2/supported-models$", self._supported_models),
        ]
        for route_method, pattern, func in routes:
            m = re.match(pattern, path)
            if m and method == route_method:
                return func(query, body, headers, **m.groupdict())
        return self._error(404, f"Unknown route {method} {path}")

    @staticmethod
    def _error(status: int, message: str | None = None):
        return status, {"error": {"message": message or f"HTTP {status}", "type": "api_error",
                                  "code": None}}, {}

    def _post_file(self, query, body, headers):
        name = "upload.jsonl"
        content_type = headers.get("Content-Type") or ""
        if content_type.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
            fields = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                      for p in message.iter_parts()}
            if fields.get("purpose") != b"fine-tune":
                return self._error(400, f"invalid purpose {fields.get('purpose')!r}")
            name = (fields.get("file_name") or b"upload.jsonl").decode()
        file_id = self._store(b"", name)["id"]
        return 302, {}, {"Location": f"{self.base_url}/upload/{file_id}", "X-Together-File-Id": file_id}

    def _put_upload(self, file_id, body):
        if file_id not in self.files:
            return self._error(404, "no such upload")
        self.file_contents[file_id] = body
        self.files[file_id]["bytes"] = len(body)
        return 200, {}, {}

    def _preprocess(self, query, body, headers, file_id):
        if file_id not in self.files:
            return self._error(404, f"No such file {file_id}")
        return 200, self.files[file_id], {}

    def _limits(self, query, body, headers):
        return 200, model_limits((query.get("model_name") or [""])[0]), {}

    def _estimate(self, query, body, headers):
        payload = json.loads(body or b"{}")
        if payload.get("training_file") not in self.files:
            return self._error(400, f"invalid training_file {payload.get('training_file')}")
        self.estimates.append(payload)
        if self.estimated_price is None:
            return 200, {"estimation_available": False, "unavailable_reason": "train_file_not_validated"}, {}
        return 200, {"estimation_available": True, "estimated_total_price": self.estimated_price,
                     "allowed_to_proceed": self.allowed_to_proceed, "user_limit": 100.0,
                     "estimated_train_token_count": 20_000.0, "estimated_eval_token_count": 2_000.0}, {}

    def _post_job(self, query, body, headers):
        payload = json.loads(body or b"{}")
        for key in ("training_file", "validation_file"):
            if payload.get(key) and payload[key] not in self.files:
                return self._error(400, f"invalid {key}: {payload[key]}")
        if not payload.get("model") or not payload.get("training_file"):
            return self._error(400, "model and training_file are required")
        job = self._create(payload, self._scripts.pop(0) if self._scripts else self.default_script)
        self.created_jobs.append(payload)
        return 200, dict(job.obj), {}

    def _list_jobs(self, query, body, headers):
        return 200, {"data": [dict(j.obj) for j in self.jobs.values()]}, {}

    def _job(self, job_id):
        if job_id not in self.jobs:
            return None, self._error(404, f"Fine-tune job {job_id} not found")
        return self.jobs[job_id], None

    def _get_job(self, query, body, headers, job_id):
        job, error = self._job(job_id)
        if error:
            return error
        self._advance(job)
        return 200, dict(job.obj, events=list(job.events)), {}

    def _cancel(self, query, body, headers, job_id):
        job, error = self._job(job_id)
        if error:
            return error
        if job.obj["status"] in TERMINAL:
            return self._error(400, f"job {job_id} already {job.obj['status']}")
        job.obj["status"] = "cancelled"
        self._event(job, "cancel_requested", "Cancelled by the user")
        return 200, dict(job.obj), {}

    def _events(self, query, body, headers, job_id):
        job, error = self._job(job_id)
        return error or (200, {"data": list(job.events)}, {})

    def _metrics(self, query, body, headers, job_id):
        job, error = self._job(job_id)
        if error:
            return error
        low = int((query.get("global_step_from") or ["0"])[0])
        rows = [r for r in job.rows[:job.visible]
                if int(r.get("train/global_step", r.get("eval/global_step", 0))) >= low]
        return 200, {"metrics": rows}, {}

    def _checkpoints(self, query, body, headers, job_id):
        job, error = self._job(job_id)
        return error or (200, {"data": list(reversed(job.checkpoints))}, {})

    def _supported_models(self, query, body, headers):
        search = (query.get("search") or [""])[0].lower()
        found = [e for e in self.catalog if search in e["id"].lower() or search in e["name"].lower()]
        start = int((query.get("after") or ["0"])[0])
        chunk = found[start:start + self.catalog_page_size]
        more = start + self.catalog_page_size < len(found)
        return 200, {"data": chunk, "next_cursor": str(start + self.catalog_page_size) if more else None}, {}

    def _chat(self, query, body, headers):
        payload = json.loads(body or b"{}")
        if not payload.get("model") or not payload.get("messages"):
            return self._error(400, "model and messages are required")
        self.chat_requests.append(payload)
        text = self.chat_responder(payload)
        prompt = sum(len(m.get("content") or "") for m in payload["messages"]) // 4 + 4
        completion = max(1, len(text) // 4)
        return 200, {"id": f"chat-{uuid.uuid4()}", "object": "chat.completion", "created": self._clock,
                     "model": payload["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                                             "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}}, {}

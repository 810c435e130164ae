"""An in-process fake of the three Google APIs the Vertex provider talks to, on 127.0.0.1, for tests.

One `ThreadingHTTPServer` with path routing serves:

1. Vertex AI tuning jobs REST (`/v1beta1|v1/projects/{p}/locations/{l}/tuningJobs[/{id}[:cancel]]`, create/get/list
   with `pageSize`/`pageToken`/`filter=labels.KEY="VALUE"`) with the documented TuningJob JSON, and
   `POST .../(endpoints/{id}|publishers/google/models/{m}):generateContent` with candidates and usageMetadata.
2. Cloud Storage JSON API uploads (`POST /upload/storage/v1/b/{bucket}/o?uploadType=multipart|resumable`, then
   `PUT` chunks to the resumable session URL), as google-cloud-storage sends them.
3. What the provider reads for curves: the job's Vertex AI Experiment (`GET .../metadataStores/default/contexts/{id}`
   with `metadata.backing_tensorboard_resource`), TensorBoard runs and time series lists (paginated), and
   `GET {timeSeries}:read` returning `timeSeriesData.values[{step, wallTime, scalar{value}}]`.

Scripting (see `JobScript`): each created job follows the next queued script (or the default one). A job's timeline
advances by one on every GET of the job (`auto_advance=True`) or on `advance(job_name)`. After `k` advances the job
shows `states[min(k, len-1)]`, gets its `experiment` once `k >= experiment_from_poll`, and every series shows its
first `k * points_per_poll` points (all of them once the state is terminal).

Faults: `fail(route, status, times=1, retry_after=None, retry_info=None, delay=0.0, message="", after_effect=False)`
queues failures for a route (`ROUTES`); like real Vertex quota errors, a 429 carries no Retry-After header and no
RetryInfo unless the test asks for one (`retry_after` seconds in the header, `retry_info` a Duration such as "7s" in
the body's `error.details`); `after_effect=True` carries the request out before failing it (a lost response);
`slow(route, seconds, times=1)` delays responses without failing them.

Thinking (2.5 models): `thinking_tokens` are spent before an answer unless the request's
`generationConfig.thinkingConfig.thinkingBudget` caps them (0 turns thinking off, refused with 400 by 2.5 Pro);
they are reported as `usageMetadata.thoughtsTokenCount` and count against `maxOutputTokens`: an answer that does not
fit is cut, with `finishReason: MAX_TOKENS` (empty when thinking used up the whole limit).

Progress: like supervised jobs, tuning jobs report `tuningDataStats.supervisedTuningDataStats.tuningStepCount`, never
`tuningJobMetadata.completedStepCount` (documented for multi-step RL only).

Records: `requests` [(method, path)], `created_jobs` [request JSON], `objects` {(bucket, name): bytes},
`uploads` [(bucket, name, uploadType)], `generate_requests` [(model, request JSON)], `auth_headers` [str].
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from tests.fakes.loopback import RESET, LoopbackServer

TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}

ROUTES = (
    "create_job", "get_job", "list_jobs", "cancel_job", "generate",
    "upload", "context", "tb_runs", "tb_series", "tb_read", "tb_export",
)

SERIES_NAMES = (
    "/train_total_loss",
    "/eval_total_loss",
    "/train_fraction_of_correct_next_step_preds",
    "/eval_fraction_of_correct_next_step_preds",
)

_STATUS_WORDS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}


def default_series(n_steps: int = 8, eval_every: int = 2) -> dict[str, list[tuple[int, float]]]:
    """Plausible curves: train series at every step, eval series every `eval_every` steps."""
    train_steps = list(range(1, n_steps + 1))
    eval_steps = [s for s in train_steps if s % eval_every == 0]
    return {
        "/train_total_loss": [(s, round(2.0 / s, 6)) for s in train_steps],
        "/eval_total_loss": [(s, round(2.2 / s, 6)) for s in eval_steps],
        "/train_fraction_of_correct_next_step_preds": [(s, round(0.5 + s / (4 * n_steps), 6)) for s in train_steps],
        "/eval_fraction_of_correct_next_step_preds": [(s, round(0.45 + s / (4 * n_steps), 6)) for s in eval_steps],
        # A series the provider must ignore.
        "/learning_rate": [(s, 0.001) for s in train_steps],
    }


@dataclass
class JobScript:
    states: list[str] = field(
        default_factory=lambda: ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    )
    # google.rpc.Status {code, message}, attached once the job is FAILED or CANCELLED.
    error: dict[str, Any] | None = None
    series: dict[str, list[tuple[int, float]]] = field(default_factory=default_series)
    points_per_poll: int = 3
    experiment_from_poll: int = 1
    # Extra supervisedTuningDataStats fields (int64 values are served as strings, like the real API).
    stats: dict[str, Any] = field(default_factory=dict)
    # Checkpoints at success, as Vertex exports them for Gemini: None = one per epoch (about 10 evenly spread
    # from 10 epochs on), the last ending training and served by the tuned model's endpoint; only that one when
    # the job was created with exportLastCheckpointOnly.
    checkpoint_epochs: list[int] | None = None
    # `TuningJob.gcsMetricsUri` (output only), shown from the first poll when set.
    gcs_metrics_uri: str | None = None


@dataclass
class _Fault:
    route: str
    status: int | None
    remaining: int
    retry_after: float | None = None
    delay: float = 0.0
    message: str = ""
    # The request takes effect (e.g. the job is created) and only then does the client get the error.
    after_effect: bool = False
    # Fire on this share of matching requests (seeded), else always.
    fraction: float | None = None
    # A google.rpc.RetryInfo retryDelay (e.g. "7s") in the error body's details.
    retry_info: str | None = None


@dataclass
class _Job:
    job_id: str
    name: str
    request: dict[str, Any]
    script: JobScript
    create_time: str
    polls: int = 0
    cancelled_at: int | None = None
    series_ids: dict[str, str] = field(default_factory=dict)


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeVertexServer(LoopbackServer):
    def __init__(self, project: str = "test-project", location: str = "us-central1", *, auto_advance: bool = True):
        self.project = project
        self.location = location
        self.auto_advance = auto_advance
        self.expected_token: str | None = None
        self.list_page_size = 2  # small, so clients must follow nextPageToken
        self.tensorboard = f"projects/{project}/locations/{location}/tensorboards/7001"
        self.answer: Callable[[str, dict[str, Any]], str] = lambda model, body: "Denver Broncos"
        # Thinking tokens a 2.5 model spends per answer when no thinking budget caps it: they think by default.
        self.thinking_tokens = 700
        self.lock = threading.RLock()
        self._rng = random.Random(0)
        self.requests: list[tuple[str, str]] = []
        self.created_jobs: list[dict[str, Any]] = []
        self.objects: dict[tuple[str, str], bytes] = {}
        self.uploads: list[tuple[str, str, str]] = []
        self.generate_requests: list[tuple[str, dict[str, Any]]] = []
        self.auth_headers: list[str] = []
        self._jobs: dict[str, _Job] = {}
        self._scripts: list[JobScript] = []
        self._faults: list[_Fault] = []
        self._sessions: dict[str, dict[str, Any]] = {}
        self._next_id = 1000

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- scripting
    def script_next_job(self, script: JobScript) -> None:
        with self.lock:
            self._scripts.append(script)

    def fail(self, route: str, status: int, *, times: int = 1, retry_after: float | None = None,
             delay: float = 0.0, message: str = "", after_effect: bool = False,
             fraction: float | None = None, retry_info: str | None = None) -> None:
        """The next `times` requests on `route` get `status` (with a Retry-After header when given).

        `after_effect=True`: the request is carried out first and the error is returned instead of its answer,
        like a response lost on the way back. `status=loopback.RESET` drops the connection instead of answering.
        `fraction` fires on that share of matching requests (seeded) until `times` is used up.
        """
        assert route in ROUTES, route
        with self.lock:
            self._faults.append(_Fault(route, status, times, retry_after, delay, message, after_effect, fraction,
                                       retry_info))

    def slow(self, route: str, seconds: float, *, times: int = 1) -> None:
        assert route in ROUTES, route
        with self.lock:
            self._faults.append(_Fault(route, None, times, delay=seconds))

    def advance(self, job_name: str, steps: int = 1) -> None:
        with self.lock:
            self._job(job_name).polls += steps

    def job_names(self) -> list[str]:
        with self.lock:
            return [job.name for job in self._jobs.values()]

    def served_series(self, job_name: str) -> dict[str, list[tuple[int, float]]]:
        with self.lock:
            return {k: list(v) for k, v in self._job(job_name).script.series.items()}

    def _job(self, name_or_id: str) -> _Job:
        return self._jobs[name_or_id.rsplit("/", 1)[-1]]

    # ----------------------------------------------------------------- job views
    def _state(self, job: _Job) -> str:
        if job.cancelled_at is not None and job.polls > job.cancelled_at:
            return "JOB_STATE_CANCELLED"
        states = job.script.states
        return states[min(job.polls, len(states) - 1)]

    def _experiment_id(self, job: _Job) -> str:
        return f"tuning-experiment-{job.job_id}"

    def _has_experiment(self, job: _Job) -> bool:
        return job.polls >= job.script.experiment_from_poll

    def _visible_points(self, job: _Job, series: str) -> list[tuple[int, float]]:
        points = job.script.series.get(series, [])
        if self._state(job) in TERMINAL:
            return points
        return points[: job.polls * job.script.points_per_poll]

    def _job_json(self, job: _Job) -> dict[str, Any]:
        state = self._state(job)
        spec = dict(job.request.get("supervisedTuningSpec", {}))
        out: dict[str, Any] = {
            "name": job.name,
            "state": state,
            "createTime": job.create_time,
            "updateTime": _now_rfc3339(),
            "baseModel": job.request.get("baseModel"),
            "supervisedTuningSpec": spec,
            "labels": job.request.get("labels", {}),
        }
        if job.script.gcs_metrics_uri:
            out["gcsMetricsUri"] = job.script.gcs_metrics_uri
        if job.request.get("tunedModelDisplayName"):
            out["tunedModelDisplayName"] = job.request["tunedModelDisplayName"]
        if state != "JOB_STATE_PENDING":
            out["startTime"] = job.create_time
        if self._has_experiment(job):
            out["experiment"] = (
                f"projects/{self.project}/locations/{self.location}/metadataStores/default/contexts/"
                f"{self._experiment_id(job)}"
            )
        if state in ("JOB_STATE_RUNNING",) or state in TERMINAL:
            train_uri = spec.get("trainingDatasetUri", "")
            n_examples = self._count_lines(train_uri)
            steps = max((s for s, _ in job.script.series.get("/train_total_loss", [])), default=0)
            stats = {
                "tuningDatasetExampleCount": str(n_examples),
                "totalTuningCharacterCount": str(n_examples * 400),
                # "Number of billable tokens in the tuning dataset" (the API reference): one pass, not x epochs.
                "totalBillableTokenCount": str(n_examples * 100),
                "tuningStepCount": str(steps),
            }
            stats.update(job.script.stats)
            out["tuningDataStats"] = {"supervisedTuningDataStats": stats}
        if state in TERMINAL:
            out["endTime"] = _now_rfc3339()
        if state == "JOB_STATE_SUCCEEDED":
            out["tunedModel"] = {
                "model": f"projects/{self.project}/locations/{self.location}/models/{job.job_id}9@1",
                "endpoint": self._endpoint(job, None),
                "checkpoints": self._checkpoints(job, spec),
            }
        if state == "JOB_STATE_FAILED":
            out["error"] = job.script.error or {"code": 3, "message": "Training failed."}
        if state == "JOB_STATE_CANCELLED":
            out["error"] = job.script.error or {"code": 1, "message": "CANCELED"}
        return out

    def _endpoint(self, job: _Job, checkpoint_id: int | None) -> str:
        """The tuned model's endpoint (None), or the one an intermediate checkpoint was deployed to."""
        suffix = "8" if checkpoint_id is None else f"7{checkpoint_id}"
        return f"projects/{self.project}/locations/{self.location}/endpoints/{job.job_id}{suffix}"

    def _checkpoints(self, job: _Job, spec: dict[str, Any]) -> list[dict[str, Any]]:
        """`tunedModel.checkpoints[]`: int64 epoch and step served as strings; the last is the default one."""
        total = max((s for s, _ in job.script.series.get("/train_total_loss", [])), default=0)
        epochs = int(spec.get("hyperParameters", {}).get("epochCount", 1))
        marks = job.script.checkpoint_epochs or sorted({max(1, round(epochs * i / min(epochs, 10)))
                                                        for i in range(1, min(epochs, 10) + 1)})
        if spec.get("exportLastCheckpointOnly"):
            marks = marks[-1:]
        return [{"checkpointId": str(i), "epoch": str(epoch), "step": str(round(total * epoch / epochs)),
                 "endpoint": self._endpoint(job, None if epoch == marks[-1] else i)}
                for i, epoch in enumerate(marks, start=1)]

    def checkpoint_step(self, model: str) -> int | None:
        """The step of an intermediate checkpoint's endpoint, None for any other model (the tuned model's endpoint
        included): lets a test's answerer give checkpoints their own quality."""
        with self.lock:
            for job in self._jobs.values():
                if self._state(job) != "JOB_STATE_SUCCEEDED":
                    continue
                for checkpoint in self._checkpoints(job, job.request.get("supervisedTuningSpec", {})):
                    if model.endswith(checkpoint["endpoint"]) and checkpoint["endpoint"] != self._endpoint(job, None):
                        return int(checkpoint["step"])
        return None

    def _count_lines(self, gcs_uri: str) -> int:
        if not gcs_uri.startswith("gs://"):
            return 0
        bucket, _, name = gcs_uri[5:].partition("/")
        data = self.objects.get((bucket, name), b"")
        return sum(1 for line in data.splitlines() if line.strip())

    # ----------------------------------------------------------------- dispatch
    def _take_fault(self, route: str) -> _Fault | None:
        with self.lock:
            for fault in self._faults:
                if fault.route == route and fault.remaining > 0:
                    if fault.fraction is not None and self._rng.random() >= fault.fraction:
                        continue
                    fault.remaining -= 1
                    return fault
        return None

    def respond(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            return self.handle(method, raw_path, headers, body)
        except Exception as e:  # noqa: BLE001 - a bug in the fake should surface as a 500, not a hang
            return _error(500, f"fake crashed: {type(e).__name__}: {e}")

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        parsed = urllib.parse.urlsplit(raw_path)
        path = urllib.parse.unquote(parsed.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        with self.lock:
            self.requests.append((method, path))
            self.auth_headers.append(headers.get("Authorization", ""))
        if self.expected_token is not None and headers.get("Authorization") != f"Bearer {self.expected_token}":
            return _error(401, "Request had invalid authentication credentials.")
        route, params = self._route(method, path, query)
        if route is None:
            return _error(404, f"fake: no route for {method} {path}")
        fault = self._take_fault(route)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is not None:
                if fault.after_effect:
                    getattr(self, f"_do_{route}")(params, query, headers, body)
                if fault.status == RESET:
                    return RESET, {}, b""
                extra = {}
                if fault.retry_after is not None:
                    value = fault.retry_after
                    extra["Retry-After"] = str(int(value)) if float(value).is_integer() else str(value)
                details = ([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": fault.retry_info}]
                           if fault.retry_info is not None else None)
                return _error(fault.status, fault.message or f"fake {route} fault", extra, details)
        return getattr(self, f"_do_{route}")(params, query, headers, body)

    _VERSION = r"/(?:v1|v1beta1)"
    _PARENT = r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"

    def _route(self, method: str, path: str, query: dict[str, str]) -> tuple[str | None, dict[str, str]]:
        v, parent = self._VERSION, self._PARENT
        table = [
            ("POST", rf"^{v}/{parent}/tuningJobs$", "create_job"),
            ("GET", rf"^{v}/{parent}/tuningJobs$", "list_jobs"),
            ("GET", rf"^{v}/{parent}/tuningJobs/(?P<job>[^/:]+)$", "get_job"),
            ("POST", rf"^{v}/{parent}/tuningJobs/(?P<job>[^/:]+):cancel$", "cancel_job"),
            ("POST", rf"^{v}/(?P<model>{parent}/(?:endpoints/[^/:]+|publishers/[^/]+/models/[^/:]+)):generateContent$",
             "generate"),
            ("GET", rf"^{v}/{parent}/metadataStores/default/contexts/(?P<context>[^/]+)$", "context"),
            ("GET", rf"^{v}/{parent}/tensorboards/(?P<tb>[^/]+)/experiments/(?P<exp>[^/]+)/runs$", "tb_runs"),
            ("GET", rf"^{v}/{parent}/tensorboards/(?P<tb>[^/]+)/experiments/(?P<exp>[^/]+)/runs/(?P<run>[^/]+)/timeSeries$",
             "tb_series"),
            ("GET", rf"^{v}/(?P<series>{parent}/tensorboards/[^/]+/experiments/[^/]+/runs/[^/]+/timeSeries/[^/:]+):read$",
             "tb_read"),
            ("POST", rf"^{v}/(?P<series>{parent}/tensorboards/[^/]+/experiments/[^/]+/runs/[^/]+/timeSeries/[^/:]+)"
                     r":exportTensorboardTimeSeries$", "tb_export"),
            ("POST", r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o$", "upload"),
            ("PUT", r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o$", "upload"),
        ]
        for verb, pattern, route in table:
            m = re.match(pattern, path)
            if verb == method and m:
                return route, m.groupdict()
        return None, {}

    # ----------------------------------------------------------------- tuning jobs
    def _do_create_job(self, params, query, headers, body):
        request = json.loads(body or b"{}")
        with self.lock:
            self.created_jobs.append(request)
            self._next_id += 1
            job_id = str(self._next_id)
            script = self._scripts.pop(0) if self._scripts else JobScript()
            name = f"projects/{params['project']}/locations/{params['location']}/tuningJobs/{job_id}"
            job = _Job(job_id, name, request, script, _now_rfc3339())
            self._jobs[job_id] = job
            return _json(200, self._job_json(job))

    def _do_get_job(self, params, query, headers, body):
        with self.lock:
            job = self._jobs.get(params["job"])
            if job is None:
                return _error(404, f"TuningJob {params['job']} not found")
            if self.auto_advance:
                job.polls += 1
            return _json(200, self._job_json(job))

    def _do_cancel_job(self, params, query, headers, body):
        with self.lock:
            job = self._jobs.get(params["job"])
            if job is None:
                return _error(404, f"TuningJob {params['job']} not found")
            job.cancelled_at = job.polls
            return _json(200, {})

    def _do_list_jobs(self, params, query, headers, body):
        with self.lock:
            jobs = list(self._jobs.values())
            label_filter = re.fullmatch(r'\s*labels\.([\w-]+)\s*=\s*"?([^"]*)"?\s*', query.get("filter", ""))
            if label_filter:
                key, value = label_filter.groups()
                jobs = [j for j in jobs if j.request.get("labels", {}).get(key) == value]
            size = int(query.get("pageSize") or self.list_page_size)
            start = int(query.get("pageToken") or 0)
            page = jobs[start : start + size]
            out: dict[str, Any] = {"tuningJobs": [self._job_json(j) for j in page]}
            if start + size < len(jobs):
                out["nextPageToken"] = str(start + size)
            return _json(200, out)

    # ----------------------------------------------------------------- prediction
    def _do_generate(self, params, query, headers, body):
        request = json.loads(body or b"{}")
        model = params["model"]
        generation = request.get("generationConfig") or {}
        # Proto JSON accepts a field's lowerCamel or original name; google-genai sends `thinking_budget`.
        thinking = generation.get("thinkingConfig") or generation.get("thinking_config") or {}
        budget = thinking.get("thinkingBudget", thinking.get("thinking_budget"))
        if budget == 0 and "gemini-2.5-pro" in model:
            return _error(400, "Budget 0 is invalid. This model only works in thinking mode.")
        with self.lock:
            self.generate_requests.append((model, request))
        text = self.answer(model, request)
        prompt_chars = sum(
            len(part.get("text", ""))
            for content in request.get("contents", []) + [request.get("systemInstruction") or {"parts": []}]
            for part in content.get("parts", [])
        )
        thoughts = self.thinking_tokens if budget is None or budget < 0 else min(self.thinking_tokens, budget)
        answer_tokens = max(1, len(text) // 4)
        limit = generation.get("maxOutputTokens")
        finish = "STOP"
        if limit is not None and thoughts + answer_tokens > limit:
            thoughts = min(thoughts, limit)
            answer_tokens = limit - thoughts
            text, finish = text[: answer_tokens * 4], "MAX_TOKENS"
        usage = {"promptTokenCount": max(1, prompt_chars // 4), "candidatesTokenCount": answer_tokens}
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        usage["totalTokenCount"] = usage["promptTokenCount"] + answer_tokens + thoughts
        content: dict[str, Any] = {"role": "model", "parts": [{"text": text}] if text else []}
        return _json(200, {
            "candidates": [{"content": content, "finishReason": finish}],
            "usageMetadata": usage,
            "modelVersion": model,
        })

    # ----------------------------------------------------------------- experiments / TensorBoard
    def _job_for_experiment(self, experiment_id: str) -> _Job | None:
        for job in self._jobs.values():
            if self._experiment_id(job) == experiment_id and self._has_experiment(job):
                return job
        return None

    def _do_context(self, params, query, headers, body):
        with self.lock:
            job = self._job_for_experiment(params["context"])
            if job is None:
                return _error(404, f"Context {params['context']} not found")
            name = f"projects/{params['project']}/locations/{params['location']}/metadataStores/default/contexts/{params['context']}"
            return _json(200, {
                "name": name,
                "displayName": params["context"],
                "schemaTitle": "system.Experiment",
                "metadata": {"backing_tensorboard_resource": self.tensorboard, "experiment_deleted": False},
            })

    def _tb_job(self, params) -> _Job | None:
        if not self.tensorboard.endswith(f"/tensorboards/{params['tb']}"):
            return None
        return self._job_for_experiment(params["exp"])

    def _do_tb_runs(self, params, query, headers, body):
        with self.lock:
            job = self._tb_job(params)
            if job is None:
                return _error(404, f"TensorboardExperiment {params['exp']} not found")
            name = f"{self.tensorboard}/experiments/{params['exp']}/runs/tuning-run-{job.job_id}"
            return _json(200, {"tensorboardRuns": [{"name": name, "displayName": f"tuning-run-{job.job_id}"}]})

    def _series_id(self, job: _Job, display_name: str) -> str:
        if display_name not in job.series_ids:
            job.series_ids[display_name] = str(900 + len(job.series_ids))
        return job.series_ids[display_name]

    def _do_tb_series(self, params, query, headers, body):
        with self.lock:
            job = self._tb_job(params)
            if job is None or params["run"] != f"tuning-run-{job.job_id}":
                return _error(404, f"TensorboardRun {params['run']} not found")
            run = f"{self.tensorboard}/experiments/{params['exp']}/runs/{params['run']}"
            items = [
                {
                    "name": f"{run}/timeSeries/{self._series_id(job, display)}",
                    "displayName": display,
                    "valueType": "SCALAR",
                    "pluginName": "scalars",
                }
                for display in job.script.series
            ]
            size = int(query.get("pageSize") or self.list_page_size)
            start = int(query.get("pageToken") or 0)
            out: dict[str, Any] = {"tensorboardTimeSeries": items[start : start + size]}
            if start + size < len(items):
                out["nextPageToken"] = str(start + size)
            return _json(200, out)

    def _series_values(self, series_name: str) -> tuple[str, list[dict[str, Any]]] | None:
        """(series id, data points as the REST API spells them) of a served series; None when unknown."""
        for job in self._jobs.values():
            for display, series_id in job.series_ids.items():
                if series_name.endswith(f"/runs/tuning-run-{job.job_id}/timeSeries/{series_id}"):
                    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
                    return series_id, [
                        {"step": str(step), "wallTime": (base + timedelta(seconds=step)).strftime(
                            "%Y-%m-%dT%H:%M:%S.%fZ"), "scalar": {"value": value}}
                        for step, value in self._visible_points(job, display)
                    ]
        return None

    def _do_tb_read(self, params, query, headers, body):
        with self.lock:
            found = self._series_values(params["series"])
        if found is None:
            return _error(404, f"TensorboardTimeSeries {params['series']} not found")
        series_id, values = found
        max_points = int(query.get("maxDataPoints") or 1000)
        if max_points > 0 and len(values) > max_points:  # the real API samples at random; keep it visible
            values = values[:max_points]
        return _json(200, {"timeSeriesData": {"tensorboardTimeSeriesId": series_id, "valueType": "SCALAR",
                                              "values": values}})

    def _do_tb_export(self, params, query, headers, body):
        """`POST {timeSeries}:exportTensorboardTimeSeries`: every point, in pages of pageSize (default 1000,
        at most 10000), pseudo-random order unless orderBy is given (here: reversed, so order is not assumed)."""
        request = json.loads(body or b"{}")
        with self.lock:
            found = self._series_values(params["series"])
        if found is None:
            return _error(404, f"TensorboardTimeSeries {params['series']} not found")
        points = found[1] if request.get("orderBy") else found[1][::-1]
        size = min(int(request.get("pageSize") or 1000), 10000)
        start = int(request.get("pageToken") or 0)
        out: dict[str, Any] = {"timeSeriesDataPoints": points[start:start + size]}
        if start + size < len(points):
            out["nextPageToken"] = str(start + size)
        return _json(200, out)

    # ----------------------------------------------------------------- Cloud Storage uploads
    def _store(self, bucket: str, name: str, data: bytes, upload_type: str) -> tuple[int, dict[str, str], bytes]:
        import google_crc32c

        with self.lock:
            self.objects[(bucket, name)] = data
            self.uploads.append((bucket, name, upload_type))
        crc = base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        return _json(200, {
            "kind": "storage#object", "id": f"{bucket}/{name}/1", "name": name, "bucket": bucket,
            "generation": "1", "metageneration": "1", "size": str(len(data)),
            "crc32c": crc, "md5Hash": md5, "contentType": "application/octet-stream",
        })

    def _do_upload(self, params, query, headers, body):
        bucket = params["bucket"]
        upload_type = query.get("uploadType", "")
        if upload_type == "multipart":
            m = re.search(r'boundary="?([^";]+)"?', headers.get("Content-Type", ""))
            if not m:
                return _error(400, "multipart upload without a boundary")
            boundary = b"--" + m.group(1).encode()
            parts = [p for p in body.split(boundary) if p not in (b"", b"--", b"--\r\n")]
            metadata_part, data_part = parts[0], parts[1]
            metadata = json.loads(metadata_part.split(b"\r\n\r\n", 1)[1].strip())
            data = data_part.split(b"\r\n\r\n", 1)[1]
            if data.endswith(b"\r\n"):
                data = data[:-2]
            return self._store(bucket, metadata.get("name") or query.get("name", ""), data, "multipart")
        if upload_type == "resumable" and "upload_id" not in query:
            metadata = json.loads(body or b"{}")
            with self.lock:
                upload_id = f"session-{len(self._sessions) + 1}"
                self._sessions[upload_id] = {"name": metadata.get("name") or query.get("name", ""), "data": b""}
            location = f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return 200, {"Location": location, "Content-Length": "0"}, b""
        if upload_type == "resumable":
            session = self._sessions.get(query["upload_id"])
            if session is None:
                return _error(404, "no such upload session")
            content_range = headers.get("Content-Range", "")
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
            if m:
                start = int(m.group(1))
                session["data"] = session["data"][:start] + body
            total = content_range.rsplit("/", 1)[-1]
            if total != "*" and len(session["data"]) >= int(total):
                return self._store(bucket, session["name"], session["data"], "resumable")
            end = len(session["data"]) - 1
            return 308, {"Range": f"bytes=0-{end}", "Content-Length": "0"}, b""
        return _error(400, f"unsupported uploadType {upload_type!r}")


def _json(status: int, payload: Any, extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    headers.update(extra or {})
    return status, headers, json.dumps(payload).encode()


def _error(status: int, message: str, extra: dict[str, str] | None = None,
           details: list[dict[str, Any]] | None = None) -> tuple[int, dict[str, str], bytes]:
    error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS_WORDS.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return _json(status, {"error": error}, extra)

"""A sample of evaluation requests as one MLflow trace per evaluation (the Traces tab): a span per sampled request
with the prompt the model saw, its answer, the gold answers, the scores, latency and tokens, so a wrong answer can
be opened and read. Recorded after the requests ran, the spans laid end to end with their measured latencies;
tracing never sits on the request path.

One trace of N spans rather than N traces: MLflow stores each trace with several transactions of its own (about
60 ms each on SQLite, 3 s for 50 requests: most of a fixed `evaluate`'s time), a span of an open trace with one.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Sequence

from mlflow.entities import Span, SpanType
from mlflow.tracking import MlflowClient

from finetune_mlflow.evaluation import ExampleResult
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt

logger = logging.getLogger(__name__)


def sample(results: Sequence[ExampleResult], size: int) -> list[ExampleResult]:
    """Up to `size` results, wrong answers first (what a reader opens traces for), then a stable spread by id."""
    ranked = sorted(results, key=lambda r: (r.f1 >= 1.0, zlib.crc32(r.id.encode())))
    return ranked[:size]


SPAN_NAME_CHARS = 80


def span_name(question: str) -> str:
    """The question itself, on one line and cut to a readable length: the trace tree lists spans by name."""
    text = " ".join(question.split()) or "(empty question)"
    return text if len(text) <= SPAN_NAME_CHARS else text[: SPAN_NAME_CHARS - 1].rstrip() + "…"


def _duration_ns(result: ExampleResult) -> int:
    return int((result.latency_ms or 0.0) * 1e6)


def _request_span(client: MlflowClient, root: Span, result: ExampleResult, context: str, model: str,
                  start_ns: int) -> int:
    """One sampled request as a child span of `root`, from `start_ns` for its latency; returns where it ends."""
    end_ns = start_ns + _duration_ns(result)
    span = client.start_span(span_name(result.question), trace_id=root.trace_id, parent_id=root.span_id,
                             span_type=SpanType.LLM, start_time_ns=start_ns,
                             attributes={"model": model, "question_id": result.id},
                             inputs={"system": SYSTEM_INSTRUCTION, "prompt": user_prompt(result.question, context)})
    client.end_span(root.trace_id, span.span_id, end_time_ns=end_ns, status="ERROR" if result.error else "OK",
                    outputs={"answer": result.prediction, "gold_answers": result.gold_answers, "f1": result.f1,
                             "em": result.em, "error": result.error},
                    attributes={"latency_ms": result.latency_ms, "input_tokens": result.input_tokens,
                                "output_tokens": result.output_tokens})
    return end_ns


def record_traces(results: Sequence[ExampleResult], contexts: dict[str, str], *, model: str, provider: str,
                  experiment_id: str, run_id: str, size: int, tags: dict[str, str] | None = None) -> int:
    """Write the sample as one trace of the run (with `tags`), a span per request named by its question;
    returns how many requests it holds (tracing failures only warn: the metrics and the table are the record)."""
    chosen = sample(results, size)
    if not chosen:
        return 0
    client = MlflowClient()
    cursor, written = time.time_ns() - sum(map(_duration_ns, chosen)), 0
    try:
        root = client.start_trace(f"evaluate {model}", experiment_id=experiment_id, run_id=run_id,
                                  start_time_ns=cursor, attributes={"model": model, "provider": provider},
                                  tags=tags or None,
                                  inputs={"model": model, "sampled_requests": len(chosen), "of": len(results)})
        try:
            for result in chosen:
                cursor = _request_span(client, root, result, contexts[result.id], model, cursor)
                written += 1
        finally:  # a trace left open is never stored: end it with the requests recorded so far
            client.end_trace(root.trace_id, end_time_ns=cursor, status="OK" if written == len(chosen) else "ERROR",
                             outputs={"recorded": written, "wrong": sum(r.f1 < 1.0 for r in chosen[:written])})
    except Exception as e:  # noqa: BLE001 - traces are a reading aid; the evaluation itself is already logged
        logger.warning("could not record evaluation traces (%s; %d of %d requests recorded); the metrics and the "
                       "table are logged", e, written, len(chosen))
    return written

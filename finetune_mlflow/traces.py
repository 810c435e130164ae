"""A sample of evaluation requests as MLflow traces (the Traces tab): the prompt a model saw, its answer, the gold
answers, the scores, latency and tokens, so a wrong answer can be opened and read. Recorded after the requests
ran, with each span's duration set to the measured latency; tracing never sits on the request path."""

from __future__ import annotations

import logging
import time
import zlib
from typing import Sequence

from mlflow.tracking import MlflowClient

from finetune_mlflow.evaluation import ExampleResult
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt

logger = logging.getLogger(__name__)


def sample(results: Sequence[ExampleResult], size: int) -> list[ExampleResult]:
    """Up to `size` results, wrong answers first (what a reader opens traces for), then a stable spread by id."""
    ranked = sorted(results, key=lambda r: (r.f1 >= 1.0, zlib.crc32(r.id.encode())))
    return ranked[:size]


def record_traces(results: Sequence[ExampleResult], contexts: dict[str, str], *, model: str, provider: str,
                  experiment_id: str, run_id: str, size: int) -> int:
    """Write the sample as traces of the run; returns how many were written (tracing failures only warn)."""
    client = MlflowClient()
    written = 0
    for result in sample(results, size):
        duration_ns = int((result.latency_ms or 0.0) * 1e6)
        end_ns = time.time_ns()
        try:
            span = client.start_trace(
                f"answer {result.id}", span_type="LLM", experiment_id=experiment_id, run_id=run_id,
                start_time_ns=end_ns - duration_ns, attributes={"model": model, "provider": provider},
                inputs={"system": SYSTEM_INSTRUCTION, "prompt": user_prompt(result.question, contexts[result.id])})
            client.end_trace(span.trace_id, end_time_ns=end_ns, status="ERROR" if result.error else "OK", outputs={
                "answer": result.prediction, "gold_answers": result.gold_answers, "f1": result.f1, "em": result.em,
                "error": result.error}, attributes={"latency_ms": result.latency_ms, "input_tokens": result.input_tokens,
                                                    "output_tokens": result.output_tokens})
            written += 1
        except Exception as e:  # noqa: BLE001 - traces are a reading aid; the evaluation itself is already logged
            logger.warning("could not record evaluation traces (%s); the metrics and the table are logged", e)
            break
    return written

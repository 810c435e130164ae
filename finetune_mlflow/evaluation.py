"""Scoring a model on examples: bounded-concurrency requests, per-example rows, and the shared metric keys.

No MLflow here: the evaluate and tune steps log what these functions return. Every example yields a row; a
failed request is a row with its error and scores 0 (as the official scorer scores a missing prediction).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.providers.base import Prediction
from finetune_mlflow.squad_metrics import best_over_golds
from finetune_mlflow.stats import bootstrap_interval, latency_summary, paired_bootstrap_delta

logger = logging.getLogger(__name__)

Predict = Callable[[str, str], Prediction]


@dataclass(frozen=True)
class ExampleResult:
    """One evaluated example: a row of the per-example table (`eval_results.json`)."""

    id: str
    question: str
    prediction: str
    gold_answers: list[str]
    em: float
    f1: float
    latency_ms: float | None
    error: str | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    retry_wait_ms: float = 0.0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ExampleResult":
        """A row read back from a logged table (older tables lack some columns; a missing error reads as NaN)."""
        error = row.get("error")
        return cls(str(row["id"]), str(row.get("question", "")), str(row.get("prediction") or ""),
                   list(row.get("gold_answers") or []), float(row["em"]), float(row["f1"]),
                   _number(row.get("latency_ms")), error if isinstance(error, str) and error else None,
                   _int(row.get("input_tokens")), _int(row.get("output_tokens")),
                   _number(row.get("retry_wait_ms")) or 0.0)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value == value else None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


@dataclass(frozen=True)
class QualityMetric:
    """A per-example score averaged into `eval_<name>` (0-100), with its bootstrap interval, its paired delta
    against a baseline, and its label where a person reads it. A new quality metric is one entry below."""

    name: str
    label: str
    of: Callable[[ExampleResult], float]  # 0-1 per example


QUALITY_METRICS = (
    QualityMetric("f1", "F1", lambda r: r.f1),
    QualityMetric("exact_match", "EM", lambda r: r.em),
)


PredictBatch = Callable[[list[tuple[str, str]]], list[Prediction]]


def _failed(example: dict[str, Any], error: Exception) -> ExampleResult:
    logger.warning("request for %s failed: %s", example["id"], error)
    return ExampleResult(example["id"], example["question"], "", list(example["answers"]), 0.0, 0.0, None,
                         f"{type(error).__name__}: {error}")


def _score_one(predict: Predict, example: dict[str, Any]) -> ExampleResult:
    try:
        prediction = predict(example["question"], example["context"])
    except Exception as e:  # noqa: BLE001 - a failed request is a result to count, not a crash
        return _failed(example, e)
    return _scored(example, prediction)


def _scored(example: dict[str, Any], prediction: Prediction) -> ExampleResult:
    em, f1 = best_over_golds(prediction.text, example["answers"])
    return ExampleResult(
        example["id"], example["question"], prediction.text, list(example["answers"]), em, f1,
        prediction.latency_ms, None, prediction.input_tokens, prediction.output_tokens, prediction.retry_wait_ms,
    )


@dataclass(frozen=True)
class EvaluationRun:
    results: list[ExampleResult]
    wall_seconds: float


def run_predictions(predict: Predict, examples: Sequence[dict[str, Any]], max_concurrency: int) -> EvaluationRun:
    """Predict every example, at most `max_concurrency` requests in flight, results in input order."""
    started = time.monotonic()
    if max_concurrency <= 1:
        results = [_score_one(predict, example) for example in examples]
    else:
        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            results = list(pool.map(lambda example: _score_one(predict, example), examples))
    return EvaluationRun(results, time.monotonic() - started)


def run_batched_predictions(predict_batch: PredictBatch, examples: Sequence[dict[str, Any]],
                            chunk_size: int = 64) -> EvaluationRun:
    """Like run_predictions for a provider that answers many requests per call (an in-process model batching on
    its device); a failed call fails the rows of its chunk only."""
    started = time.monotonic()
    results: list[ExampleResult] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        try:
            predictions = predict_batch([(e["question"], e["context"]) for e in chunk])
        except Exception as e:  # noqa: BLE001 - a failed request is a result to count, not a crash
            results += [_failed(example, e) for example in chunk]
            continue
        results += [_scored(example, prediction) for example, prediction in zip(chunk, predictions)]
    return EvaluationRun(results, time.monotonic() - started)


def summarize(run: EvaluationRun, *, bootstrap_samples: int, seed: int, prefix: str = "eval_") -> dict[str, float]:
    """The shared metric keys: EM/F1 (0-100) with 95% bootstrap intervals, counts, latency, tokens."""
    results = run.results
    metrics: dict[str, float] = {f"{prefix}n": float(len(results))}
    errors = sum(1 for r in results if r.error)
    metrics[f"{prefix}error_count"] = float(errors)
    for metric in QUALITY_METRICS:
        interval = bootstrap_interval([100.0 * metric.of(r) for r in results], samples=bootstrap_samples, seed=seed)
        metrics[f"{prefix}{metric.name}"] = interval.estimate
        metrics[f"{prefix}{metric.name}_ci_low"] = interval.low
        metrics[f"{prefix}{metric.name}_ci_high"] = interval.high
    if run.wall_seconds > 0:
        metrics[f"{prefix}throughput_rps"] = len(results) / run.wall_seconds
    ok = [r for r in results if r.error is None]
    metrics.update(latency_summary([r.latency_ms for r in ok]))
    metrics[f"{prefix}retry_wait_ms_total"] = float(sum(r.retry_wait_ms for r in ok))
    for key in ("input_tokens", "output_tokens"):
        counted = [getattr(r, key) for r in ok if getattr(r, key) is not None]
        if counted:
            metrics[f"{prefix}{key}"] = float(sum(counted))
    return metrics


def check_error_rate(run: EvaluationRun, max_error_rate: float) -> None:
    errors = [r for r in run.results if r.error]
    if run.results and len(errors) / len(run.results) > max_error_rate:
        raise FinetuneError(
            f"{len(errors)} of {len(run.results)} evaluation requests failed ({len(errors) / len(run.results):.1%}, "
            f"over evaluate.max_error_rate={max_error_rate}); first error: {errors[0].error}"
        )


def delta_against(candidate: Sequence[ExampleResult], baseline: Sequence[ExampleResult], *,
                  bootstrap_samples: int, seed: int, prefix: str = "eval_") -> dict[str, float]:
    """`<prefix><metric>_delta` of every quality metric with its paired-bootstrap 95% interval, over the questions
    both evaluations answered; empty when they share none."""
    base = {r.id: r for r in baseline}
    shared = [r for r in candidate if r.id in base]
    if not shared:
        return {}
    metrics = {f"{prefix}delta_n": float(len(shared))}
    for metric in QUALITY_METRICS:
        interval = paired_bootstrap_delta([100.0 * metric.of(r) for r in shared],
                                          [100.0 * metric.of(base[r.id]) for r in shared],
                                          samples=bootstrap_samples, seed=seed)
        metrics[f"{prefix}{metric.name}_delta"] = interval.estimate
        metrics[f"{prefix}{metric.name}_delta_ci_low"] = interval.low
        metrics[f"{prefix}{metric.name}_delta_ci_high"] = interval.high
    return metrics


def error_rate(results: Sequence[ExampleResult]) -> float:
    return sum(1 for r in results if r.error) / len(results) if results else 1.0


def result_rows(results: Sequence[ExampleResult]) -> dict[str, list[Any]]:
    """Column-oriented rows for `mlflow.log_table`."""
    rows = [asdict(r) for r in results]
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

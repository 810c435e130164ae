"""The few numbers a person reads first, and the one-line descriptions built from them (run descriptions, the
`main` parent's headline, what the CLI prints). Metric keys are the ones `evaluation.summarize` logs."""

from __future__ import annotations

import math
from typing import Mapping

from finetune_mlflow.evaluation import QUALITY_METRICS

# What a parent run (main, sweep) copies from its winning tune run.
HEADLINE_METRICS = ("eval_f1", "eval_exact_match", "base_eval_f1", "base_eval_exact_match", "eval_f1_delta",
                    "eval_f1_delta_ci_low", "eval_f1_delta_ci_high", "latency_ms_p95")


def base_scores(base_metrics: Mapping[str, float]) -> dict[str, float]:
    """A base evaluation run's scores under the names a tune run's summary reads them by (`base_eval_f1`, ...)."""
    return {f"base_{k}": v for k, v in base_metrics.items() if k.startswith(("eval_", "latency_ms_"))}


def _num(metrics: Mapping[str, float], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def describe_evaluation(metrics: Mapping[str, float]) -> str:
    """`F1 46.3 [44.1, 48.5], EM 36.8 [34.2, 39.3], n=1342, errors 0, p50 0.4 ms` (every quality metric)."""
    scores = ", ".join(f"{m.label} {_num(metrics, f'eval_{m.name}')} [{_num(metrics, f'eval_{m.name}_ci_low')}, "
                       f"{_num(metrics, f'eval_{m.name}_ci_high')}]" for m in QUALITY_METRICS)
    return (f"{scores}, n={metrics.get('eval_n', 0):.0f}, errors {metrics.get('eval_error_count', 0):.0f}, "
            f"p50 {_num(metrics, 'latency_ms_p50')} ms")


def describe_tune(metrics: Mapping[str, float], job_id: str = "") -> str:
    """`F1 46.3 EM 36.8; +16.5 F1 over base 29.8 [95% CI +14.9, +18.1]; job localjob-ab12` (the base's F1 and
    the job only when known)."""
    scores = " ".join(f"{m.label} {_num(metrics, f'eval_{m.name}')}" for m in QUALITY_METRICS)
    gain = ""
    if "eval_f1_delta" in metrics:
        base = f" {_num(metrics, 'base_eval_f1')}" if "base_eval_f1" in metrics else ""
        gain = (f"; {metrics['eval_f1_delta']:+.1f} F1 over base{base} "
                f"[95% CI {metrics.get('eval_f1_delta_ci_low', math.nan):+.1f}, "
                f"{metrics.get('eval_f1_delta_ci_high', math.nan):+.1f}]")
    return f"{scores}{gain}" + (f"; job {job_id}" if job_id else "")

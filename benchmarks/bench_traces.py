"""Benchmark: recording an evaluation's sample of requests as N traces (the old way) vs one trace of N spans
(`traces.record_traces`), until the store holds them (synchronous export; the async queue only moves the wait).

Both ways write the same prompts and outputs into one fresh SQLite store, after a warm-up trace, alternating per
repetition. Usage (repository root): `python -m benchmarks.bench_traces [--samples 50] [--reps 3]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"  # time the writes themselves, not a queue

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from finetune_mlflow.evaluation import ExampleResult  # noqa: E402
from finetune_mlflow.traces import record_traces  # noqa: E402

PROMPT = "Context: " + "word " * 150  # a SQuAD passage is ~120 words


def results(n: int) -> list[ExampleResult]:
    return [ExampleResult(f"q{i}", f"question {i}?", f"answer {i}", [f"gold {i}"], 0.0, 0.5, 1.2, None)
            for i in range(n)]


def one_trace_per_request(client: MlflowClient, rows: list[ExampleResult], experiment_id: str, run_id: str) -> None:
    """What `record_traces` did before: a trace per request."""
    for r in rows:
        span = client.start_trace(f"answer {r.id}", span_type="LLM", experiment_id=experiment_id, run_id=run_id,
                                  inputs={"prompt": PROMPT}, attributes={"model": "m"})
        client.end_trace(span.trace_id, outputs={"answer": r.prediction, "f1": r.f1},
                         attributes={"latency_ms": r.latency_ms})


def timed(way, *args) -> float:
    started = time.perf_counter()
    way(*args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        client = MlflowClient()
        experiment_id = client.create_experiment("bench-traces")
        run_id = client.create_run(experiment_id).info.run_id
        rows, contexts = results(args.samples), {f"q{i}": PROMPT for i in range(args.samples)}
        one_trace_per_request(client, rows[:1], experiment_id, run_id)  # warm-up: tables, exporter, imports
        old, new = [], []
        for _ in range(args.reps):
            old.append(timed(one_trace_per_request, client, rows, experiment_id, run_id))
            new.append(timed(lambda: record_traces(rows, contexts, model="m", provider="local",
                                                   experiment_id=experiment_id, run_id=run_id,
                                                   size=args.samples)))
    for name, seconds in (("a trace per request", old), ("one trace, a span each", new)):
        print(f"{name:>22}: {statistics.median(seconds):.2f} s (range {min(seconds):.2f}-{max(seconds):.2f}) "
              f"for {args.samples}")
    print(f"{statistics.median(old) / statistics.median(new):.1f}x faster; load average after: "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

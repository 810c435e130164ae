"""Benchmark: streaming N metric points one `log_metric` call each vs `MetricSink` (deduplicated `log_batch`).

Both run side by side in one process against the same kind of store, so the ratio is what matters, not the
absolute times. Usage: `python tests/benchmarks/bench_metric_logging.py [--points 2000] [--tracking-uri URI]`
(default: a fresh SQLite store in a temporary directory).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.providers.base import MetricPoint
from finetune_mlflow.tracking import MetricSink


def points(n: int) -> list[MetricPoint]:
    now = int(time.time() * 1000)
    return [MetricPoint("train_loss", 1.0 / (step + 1), step, now + step) for step in range(1, n + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--tracking-uri", default="")
    args = parser.parse_args()
    uri = args.tracking_uri or f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment(f"bench-{time.time_ns()}")
    data = points(args.points)

    one_by_one = client.create_run(experiment).info.run_id
    started = time.perf_counter()
    for point in data:
        client.log_metric(one_by_one, point.key, point.value, point.timestamp_ms, point.step)
    single = time.perf_counter() - started

    batched = client.create_run(experiment).info.run_id
    started = time.perf_counter()
    MetricSink(client, batched).log(data)
    batch = time.perf_counter() - started

    assert len(client.get_metric_history(batched, "train_loss")) == args.points
    print(f"store: {uri}")
    print(f"{args.points} points, one log_metric per point: {single:.2f} s")
    print(f"{args.points} points, MetricSink (log_batch):    {batch:.2f} s")
    print(f"speed-up: {single / batch:.1f}x")


if __name__ == "__main__":
    main()

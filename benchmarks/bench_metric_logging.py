"""Benchmark: streaming metric points one `log_metric` call per point vs `MetricSink` (deduplicated `log_batch`).

Equal work on both sides: the same points, delivered in polls of `--batch` points (a real poll of a fine-tuning
job brings a few dozen; 26 in the run the issue measured), each side on a fresh run of the same store, after a
warm-up poll on both. The reference is the per-point path measured in the same run, alternating with the sink on
every repetition. Usage (repository root): `python -m benchmarks.bench_metric_logging [--quick] [--points 2000]
[--batch 26 2000] [--reps 3] [--tracking-uri URI]` (default: a fresh SQLite store in a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.providers.base import MetricPoint
from finetune_mlflow.tracking import MetricSink

LogPoll = Callable[[list[MetricPoint]], None]


def points(n: int) -> list[MetricPoint]:
    now = int(time.time() * 1000)
    return [MetricPoint("train_loss", 1.0 / (step + 1), step, now + step) for step in range(1, n + 1)]


def per_point(client: MlflowClient, run_id: str) -> LogPoll:
    def log(poll: list[MetricPoint]) -> None:
        for p in poll:
            client.log_metric(run_id, p.key, p.value, p.timestamp_ms, p.step)
    return log


def sink(client: MlflowClient, run_id: str) -> LogPoll:
    return MetricSink(client, run_id).log


def timed(client: MlflowClient, experiment: str, make: Callable[[MlflowClient, str], LogPoll],
          data: list[MetricPoint], batch: int) -> float:
    """Seconds to log `data` in polls of `batch` on a fresh run (after one warm-up poll of step 0)."""
    run_id = client.create_run(experiment).info.run_id
    log = make(client, run_id)
    log([MetricPoint("train_loss", 1.0, 0, data[0].timestamp_ms)])
    started = time.perf_counter()
    for start in range(0, len(data), batch):
        log(data[start:start + batch])
    elapsed = time.perf_counter() - started
    assert len(client.get_metric_history(run_id, "train_loss")) == len(data) + 1, "points went missing"
    return elapsed


def compare(client: MlflowClient, experiment: str, data: list[MetricPoint], batch: int, reps: int) -> None:
    single, batched = [], []
    for _ in range(reps):
        single.append(timed(client, experiment, per_point, data, batch))
        batched.append(timed(client, experiment, sink, data, batch))
    ratios = sorted(s / b for s, b in zip(single, batched))
    print(f"polls of {batch:>5} points: per-point log_metric {statistics.median(single):.2f} s "
          f"(range {min(single):.2f}-{max(single):.2f}), MetricSink {statistics.median(batched):.3f} s "
          f"(range {min(batched):.3f}-{max(batched):.3f}); speed-up {statistics.median(ratios):.1f}x "
          f"(range {ratios[0]:.1f}-{ratios[-1]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--batch", type=int, nargs="+", default=[26, 2000], help="points per poll")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tracking-uri", default="")
    parser.add_argument("--quick", action="store_true", help="520 points, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.points, args.reps = 520, 2
    with tempfile.TemporaryDirectory() as scratch:
        uri = args.tracking_uri or f"sqlite:///{Path(scratch) / 'bench.db'}"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        experiment = client.create_experiment(f"bench-{time.time_ns()}")
        print(f"store: {uri.split('///')[0]}, {args.points} points, {args.reps} repetitions, "
              f"load {os.getloadavg()[0]:.1f}")
        for batch in args.batch:
            compare(client, experiment, points(args.points), batch, args.reps)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

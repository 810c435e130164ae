"""Benchmark: reading the loss curves of a sweep's runs for the report, one `get_metric_history` call after another
vs 8 threads (what `report.collect._curves` uses against a tracking server).

Both read the same runs from the same store, alternating, so the ratio is what matters. The client API has no
multi-run history call; the pool pays off against a tracking server (round trips overlap), not against SQLite.
Usage: `python -m benchmarks.bench_report_curves [--quick] [--runs 24] [--reps 5] [--tracking-uri URI]` (default: a
fresh SQLite store in a temporary directory; for a server, start `mlflow server` on that store and pass its URL).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from finetune_mlflow.report import collect

EXPERIMENT = "bench-report-curves"


def ensure_runs(client: MlflowClient, n_runs: int, artifacts: Path) -> list:
    """n finished tune runs with 800 train_loss and 32 val_loss points each (a local run on the full data)."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    eid = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT, str(artifacts))
    runs = collect._search(client, [eid], collect.TUNE_FILTER)
    for _ in range(n_runs - len(runs)):
        run_id = client.create_run(eid, tags={"finetune.step": "tune"}).info.run_id
        points = [Metric("train_loss", 1.0 / s, s, s) for s in range(1, 801)]
        points += [Metric("val_loss", 1.0 / s, s, s) for s in range(25, 801, 25)] + [Metric("eval_f1", 50.0, 0, 0)]
        client.log_batch(run_id, metrics=points)
        client.set_terminated(run_id)
    return collect._search(client, [eid], collect.TUNE_FILTER)[:n_runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tracking-uri", default="")
    parser.add_argument("--quick", action="store_true", help="8 runs, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.reps = 8, 2
    with tempfile.TemporaryDirectory() as folder:
        client = MlflowClient(args.tracking_uri or f"sqlite:///{Path(folder) / 'bench.db'}")
        runs = ensure_runs(client, args.runs, Path(folder) / "artifacts")
        pairs = [(run.info.run_id, key) for run in runs for key in collect.CURVE_KEYS]
        ways = {"one after another": lambda: [collect._history(client, *pair) for pair in pairs],
                "8 threads": lambda: list(ThreadPoolExecutor(8).map(lambda pair: collect._history(client, *pair),
                                                                     pairs))}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.reps):
            for name, read in ways.items():
                started = time.perf_counter()
                read()
                times[name].append(time.perf_counter() - started)
        for name, seconds in times.items():
            print(f"{client.tracking_uri.split(':')[0]} {name:18} {len(pairs)} histories: median "
                  f"{statistics.median(seconds):.3f}s (range {min(seconds):.3f}-{max(seconds):.3f}s, {args.reps} reps)")


if __name__ == "__main__":
    main()

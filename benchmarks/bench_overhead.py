"""Benchmark: the fixed overhead of `mlflow run . -e tune` and of `-e evaluate`: wall time minus the work.

The work is what no plumbing can remove: the local training job (its spec written to its status settled) and the
predictions (`eval_n / eval_throughput_rps` of each evaluation the run made, the checkpoints' from
`checkpoints.json`; earlier rows of BENCHMARKS.md counted those as overhead, and the report gives that figure too).
Overhead is the rest: process starts, imports, MLflow round trips, registration, polling, exit. Each checkout gets
its own store and jobs folder and one untimed warm-up `tune` (creating the store's tables and the prepare run,
which a user pays once); then `--reps` timed `tune` runs, `evaluate` runs of the registered version, and the same
evaluation started directly (`python -m finetune_mlflow evaluate`, no `mlflow run` process). `--reference DIR`
runs a second checkout (e.g. a `git worktree` of an older commit) the same way, alternating, for the ratio.
Usage (repository root): `python -m benchmarks.bench_overhead [--quick] [--reps 3] [--reference DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

HERE = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # this process's downloads of checkpoints.json
DIRECT = "direct"  # `python -m finetune_mlflow evaluate`, not through `mlflow run`


def mlflow_run(checkout: Path, home: Path, entry: str, *params: str) -> float:
    """Wall seconds of one `mlflow run . -e <entry> --env-manager local` from `checkout` (entry `direct`: `python
    -m finetune_mlflow evaluate` there, the params as options)."""
    command = ["mlflow", "run", ".", "-e", entry, "--env-manager", "local"]
    for param in params:
        command += ["-P", param]
    if entry == DIRECT:
        command = [sys.executable, "-m", "finetune_mlflow", "evaluate"]
        command += [part for param in params for part in (f"--{param.split('=')[0]}", param.split("=", 1)[1])]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "FINETUNE_MLFLOW_HOME": str(home),
           "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed in {checkout}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def prediction_seconds(metrics: dict[str, float], prefix: str) -> float:
    """`<prefix>eval_n / <prefix>eval_throughput_rps`: the evaluation's requests, start to end."""
    rps = metrics.get(f"{prefix}eval_throughput_rps")
    return metrics[f"{prefix}eval_n"] / rps if rps else 0.0


def job_seconds(home: Path, job_id: str) -> float:
    job = home / "local-jobs" / Path(job_id).name
    status = json.loads((job / "status.json").read_text())
    return status["updated"] - (job / "spec.json").stat().st_mtime


def checkpoint_seconds(client: MlflowClient, run_id: str, final_seconds: float) -> float:
    """Predictions of the run's checkpoint evaluations (`checkpoints.json`, the final model's row first): n /
    throughput of each; a table without those columns (older checkouts) counts each checkpoint as long as the
    final model's evaluation (the same questions, the same model code); a reused evaluation has no throughput."""
    if "checkpoints.json" not in {a.path for a in client.list_artifacts(run_id)}:
        return 0.0
    with tempfile.TemporaryDirectory() as folder:
        document = json.loads(Path(client.download_artifacts(run_id, "checkpoints.json", folder)).read_text())
    rows = [dict(zip(document["columns"], row)) for row in document["data"]][1:]
    return sum(final_seconds if "eval_throughput_rps" not in row
               else row["eval_n"] / row["eval_throughput_rps"] if row["eval_throughput_rps"] else 0.0
               for row in rows)


def latest_run_work(home: Path, step: str) -> tuple[float, float]:
    """Seconds of work in the newest top-level `step` run of the store: (training job plus predictions, of which
    checkpoint predictions)."""
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`finetune.step` = '{step}'",
                              order_by=["attributes.start_time DESC"])
    run = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    job_id = run.data.tags.get("finetune.job_id")
    tuned, base = (prediction_seconds(run.data.metrics, prefix) for prefix in ("", "base_"))
    checkpoints = checkpoint_seconds(client, run.info.run_id, tuned) if job_id else 0.0
    return tuned + base + checkpoints + (job_seconds(home, job_id) if job_id else 0.0), checkpoints


def timed(checkout: Path, home: Path, step: str, params: list[str]) -> tuple[float, float, float]:
    """Wall and overhead seconds of one run of `step`, and its checkpoint predictions (earlier rows of
    BENCHMARKS.md counted them as overhead)."""
    wall = mlflow_run(checkout, home, step, *params)
    work, checkpoints = latest_run_work(home, "evaluate" if step == DIRECT else step)
    return wall, wall - work, checkpoints


def report(name: str, step: str, samples: list[tuple[float, float, float]]) -> float:
    walls, overheads = [w for w, _, _ in samples], [o for _, o, _ in samples]
    shares = [o / w for w, o, _ in samples]
    old = [o + c for _, o, c in samples]
    print(f"{step:>8}, {name:>9}: wall {statistics.median(walls):5.1f} s (range {min(walls):.1f}-{max(walls):.1f}), "
          f"overhead {statistics.median(overheads):5.1f} s (range {min(overheads):.1f}-{max(overheads):.1f}), "
          f"{100 * statistics.median(shares):.0f}% of the wall; checkpoint predictions counted as overhead: "
          f"{statistics.median(old):.1f} s ({min(old):.1f}-{max(old):.1f})")
    return statistics.median(overheads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--reference", type=Path, help="another checkout to run side by side")
    parser.add_argument("--quick", action="store_true",
                        help="500 training examples, one repetition (about 90 s: a tune alone takes ~30 s)")
    args = parser.parse_args()
    tune_params = ["max_examples=500"] if args.quick else []
    reps = 1 if args.quick else args.reps
    checkouts = {"this": HERE} | ({"reference": args.reference.resolve()} if args.reference else {})
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as scratch:
        homes = {name: Path(scratch) / name for name in checkouts}
        samples: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for name, checkout in checkouts.items():
            mlflow_run(checkout, homes[name], "tune", *tune_params)  # warm-up: store tables, prepare run
        for _ in range(reps):
            for name, checkout in checkouts.items():
                samples.setdefault((name, "tune"), []).append(timed(checkout, homes[name], "tune", tune_params))
                for step in ("evaluate", DIRECT):
                    samples.setdefault((name, step), []).append(
                        timed(checkout, homes[name], step, [*tune_params, "model=models:/squad-qa-local/1"]))
        medians = {key: report(*key, values) for key, values in samples.items()}
    for step in ("tune", "evaluate", DIRECT):
        if ("reference", step) in medians:
            print(f"{step}: overhead {medians[('reference', step)] / medians[('this', step)]:.1f}x smaller than the reference's")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

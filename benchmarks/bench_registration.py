"""Benchmark: seconds to register one tuned local model (`register_tuned_model`: log the pyfunc, create the version).

Each checkout runs in a process of its own (`PYTHONPATH` = the checkout) against a fresh SQLite store whose tables
exist: the first registration of the process (what `tune` pays: imports and first-call caches included; it is
started after `registry.warm_up` where the checkout has it and a 3 s pause, the least a job trains), then `--reps`
more, each into a new run shaped like a tune run's: a `train_loss`/`val_loss` history, summary
metrics, and the evaluation's metrics linked to a LoggedModel created before it. The weights are the local model's
initial weights with the idf of the shipped training contexts (the size of a real `weights.npz`).
`--reference DIR` runs another checkout the same way, alternating `--rounds` times.
Usage (repository root): `python -m benchmarks.bench_registration [--reps 5] [--rounds 2] [--reference DIR]`;
`--profile FILE` writes a cProfile of the timed registrations of this checkout (read with pstats).
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

HERE = Path(__file__).resolve().parent.parent
STEPS, SUMMARY_METRICS = 800, 60  # ~3 epochs of the default tune; eval_*, base_eval_*, latency, cost, candidates


def weights_file(folder: Path) -> Path:
    """`<folder>/localjob-.../weights.npz` as the trainer writes it."""
    from finetune_mlflow.providers.local import span_model
    from finetune_mlflow.providers.local.provider import save_weights
    from finetune_mlflow.providers.local.trainer import idf_of
    from finetune_mlflow.records import read_examples

    rows = [{"context": e["context"]} for e in read_examples(HERE / "data" / "squad" / "train.json")]
    path = folder / "localjob-0123456789ab" / "weights.npz"
    path.parent.mkdir(parents=True)
    save_weights(path, span_model.initial_weights(8), idf_of(rows), 8)
    return path


def tune_shaped_run(experiment_id: str) -> tuple[str, str]:
    """A run holding what a tune run holds when it registers; returns (run id, LoggedModel id)."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    run_id = mlflow.start_run(experiment_id=experiment_id).info.run_id
    now = int(time.time() * 1000)
    curve = [Metric("train_loss", 1.0 / s, now, s) for s in range(1, STEPS + 1)]
    curve += [Metric("val_loss", 1.0 / s, now, s) for s in range(25, STEPS + 1, 25)]
    client.log_batch(run_id, metrics=curve)
    model_id = mlflow.initialize_logged_model(name="model", source_run_id=run_id).model_id
    linked = [Metric(f"eval_m{i}", float(i), now, 0, model_id=model_id, run_id=run_id) for i in range(20)]
    plain = [Metric(f"summary_m{i}", float(i), now, 0) for i in range(SUMMARY_METRICS - 20)]
    client.log_batch(run_id, metrics=linked + plain)
    return run_id, model_id


def register_once(config, weights: Path, experiment_id: str, index: int) -> float:
    """Seconds of one `register_tuned_model` call (the run's setup not counted)."""
    import mlflow
    from finetune_mlflow.registry import register_tuned_model

    run_id, model_id = tune_shaped_run(experiment_id)
    started = time.perf_counter()
    register_tuned_model(run_id=run_id, config=config, provider="local", model_id=f"{weights.parent.name}/weights.npz",
                         logged_model_id=model_id, artifacts={"weights": str(weights)}, packages=("numpy",),
                         tags={"provider": "local", "tuned_model": f"{weights.parent.name}/weights.npz",
                               "base_model": "span-ranker-base", "source_run": run_id, "index": str(index)},
                         description=f"benchmark version {index}")
    elapsed = time.perf_counter() - started
    mlflow.end_run()
    return elapsed


def worker(reps: int, profile: str | None) -> None:
    """In a checkout's own process: the first registration, then `reps` more; prints the seconds as JSON."""
    import mlflow
    import finetune_mlflow
    from finetune_mlflow import registry
    from finetune_mlflow.config import load_config

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        os.chdir(folder)  # the store's artifacts (`./mlruns`) go to the scratch folder, not the checkout
        mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        os.environ["FINETUNE_MLFLOW_HOME"] = str(folder / "home")
        config = load_config(HERE / "experiments" / "squad_local.yaml", {})
        weights = weights_file(folder / "home" / "local-jobs")
        experiment_id = mlflow.set_experiment("bench-registration").experiment_id
        mlflow.MlflowClient().search_registered_models()  # the store's tables, created once per store
        if hasattr(registry, "warm_up"):
            registry.warm_up(("numpy",))
        time.sleep(3.0)  # the job trains
        first = register_once(config, weights, experiment_id, 0)
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        seconds = [register_once(config, weights, experiment_id, i) for i in range(1, reps + 1)]
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
    print(json.dumps({"package": finetune_mlflow.__file__, "first": first, "seconds": seconds}))


def run_worker(checkout: Path, reps: int, profile: str | None) -> tuple[float, list[float]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--reps", str(reps)]
    command += ["--profile", profile] if profile else []
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker failed in {checkout}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(checkout), f"{checkout} ran {result['package']}"
    return result["first"], result["seconds"]


def report(name: str, what: str, seconds: list[float]) -> None:
    print(f"{name:>9}, {what:>21}: {statistics.median(seconds):.2f} s per version (range {min(seconds):.2f}-"
          f"{max(seconds):.2f}, n={len(seconds)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed registrations per worker process")
    parser.add_argument("--rounds", type=int, default=2, help="worker processes per checkout, alternating")
    parser.add_argument("--reference", type=Path, help="another checkout to run side by side")
    parser.add_argument("--profile", help="cProfile output of this checkout's timed registrations")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.reps, args.profile)
        return
    checkouts = {"this": HERE} | ({"reference": args.reference.resolve()} if args.reference else {})
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    firsts: dict[str, list[float]] = {name: [] for name in checkouts}
    samples: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            first, seconds = run_worker(checkout, args.reps, args.profile if name == "this" else None)
            firsts[name].append(first)
            samples[name] += seconds
    for name in checkouts:
        report(name, "first in a process", firsts[name])
        report(name, "each further version", samples[name])
    if args.reference:
        for what, values in (("first", firsts), ("further", samples)):
            print(f"{what}: {statistics.median(values['reference']) / statistics.median(values['this']):.1f}x "
                  "faster than the reference")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

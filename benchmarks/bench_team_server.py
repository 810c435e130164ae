"""Benchmark: `main` against a team server (PostgreSQL + S3-compatible artifacts) beside the embedded SQLite default,
and registering a model with the whole package as code (the previous way) beside only what serving imports.

Everything runs in one invocation, interleaved repetition by repetition, so both sides see the same machine load.
Each `main` repetition is a new experiment (nothing reused from earlier ones) in one store per backend; the server
is `tests/team_servers.py`'s: a fresh PostgreSQL database, moto's S3 on loopback, `mlflow server` proxying.
Needs PostgreSQL on 127.0.0.1:5432. Usage: `python -m benchmarks.bench_team_server [--quick] [--reps N]`
(`--quick`: a 200-example, 1-epoch `main`, as in the team-deployment test; default: the shipped data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.config import load_config
from finetune_mlflow.providers.local import span_model
from finetune_mlflow.providers.local.provider import save_weights
from finetune_mlflow.registry import EXAMPLE_INPUT, PACKAGE_DIR, register_tuned_model
from tests import team_servers as team
from tests.conftest import ROOT, SQUAD_TRAIN, SQUAD_VALIDATION, squad_subset

QUICK = ["--max_examples", "200", "--epochs", "1", "--set", "data.max_validation_examples=60"]


def spread(seconds: list[float]) -> str:
    return (f"median {statistics.median(seconds):6.2f} s  (min {min(seconds):.2f}, max {max(seconds):.2f}, "
            f"n={len(seconds)})")


def timed_main(env: dict[str, str], data: list[str], folder: Path, experiment: str) -> float:
    command = [sys.executable, "-m", "finetune_mlflow", "main", "--config",
               str(ROOT / "experiments" / "squad_local.yaml"), *data]
    started = time.perf_counter()
    done = subprocess.run(command, env={**env, "MLFLOW_EXPERIMENT_NAME": experiment}, cwd=folder,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"main failed:\n{done.stderr[-3000:]}")
    return elapsed


def quick_data(folder: Path) -> list[str]:
    train, validation = folder / "train.json", folder / "validation.json"
    train.write_text(json.dumps(squad_subset(SQUAD_TRAIN, 12, 50)), encoding="utf-8")
    validation.write_text(json.dumps(squad_subset(SQUAD_VALIDATION, 4, 30)), encoding="utf-8")
    return ["--train_data", str(train), "--validation_data", str(validation), *QUICK]


def bench_main(url: str, folder: Path, reps: int, data: list[str]) -> dict[str, list[float]]:
    extra = {"PYTHONPATH": str(ROOT), "FINETUNE_MLFLOW_HOME": str(folder / "home")}
    backends = {"sqlite (embedded default)": team.client_env(f"sqlite:///{folder / 'mlflow.db'}", **extra),
                "server (PostgreSQL + S3)": team.client_env(url, **extra)}
    # Create the SQLite tables once, outside the timings (the server's database was migrated at start-up).
    subprocess.run([sys.executable, "-c", "from mlflow.tracking import MlflowClient; "
                    "MlflowClient().search_experiments()"], env=backends["sqlite (embedded default)"], check=True)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for rep in range(reps):
        for name, backend_env in backends.items():
            times[name].append(timed_main(backend_env, data, folder, f"bench-main-{rep}"))
            print(f"  rep {rep + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    return times


def old_registration(run_id: str, weights: Path) -> None:
    """The previous registry call: the whole package folder as code, the weights by their absolute path."""
    from mlflow.models import infer_signature
    import pandas as pd

    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(PACKAGE_DIR / "serving.py"), artifacts={"weights": str(weights)},
        model_config={"provider": "local", "model_id": str(weights), "provider_settings": {}},
        code_paths=[str(PACKAGE_DIR)], input_example=EXAMPLE_INPUT,
        signature=infer_signature(EXAMPLE_INPUT, pd.DataFrame({"answer": ["Warsaw"]})))
    MlflowClient().create_model_version("bench-old", info.model_uri, run_id=run_id, model_id=info.model_id)


def bench_registration(url: str, endpoint: str, folder: Path, reps: int) -> None:
    mlflow.set_tracking_uri(url)
    jobs = folder / "reg-jobs"
    (jobs / "localjob-bench").mkdir(parents=True)
    weights = jobs / "localjob-bench" / "weights.npz"
    save_weights(weights, span_model.initial_weights(8), {"the": 1.0}, 8)
    config = load_config(None, {"local.jobs_dir": str(jobs), "registered_model_name": "bench-new"})
    mlflow.set_experiment("bench-register")
    MlflowClient().create_registered_model("bench-old")
    times: dict[str, list[float]] = {"whole package (before)": [], "serving imports (after)": []}
    for _ in range(reps):
        for name in times:
            with mlflow.start_run() as run:
                started = time.perf_counter()
                if name.startswith("whole"):
                    old_registration(run.info.run_id, weights)
                else:
                    register_tuned_model(run_id=run.info.run_id, config=config, provider="local",
                                         model_id="localjob-bench/weights.npz", logged_model_id=None,
                                         artifacts={"weights": str(weights)}, packages=("numpy",), tags={},
                                         description="")
                times[name].append(time.perf_counter() - started)
    keys = [k for k in team.bucket_keys(endpoint) if "/models/m-" in k]
    per_model: dict[str, int] = {}
    for key in keys:
        model = key.split("/models/")[1].split("/")[0]
        per_model[model] = per_model.get(model, 0) + 1
    client = MlflowClient()
    for name, registered in (("whole package (before)", "bench-old"), ("serving imports (after)", "bench-new")):
        counts = sorted({per_model[v.source.rsplit("/", 1)[-1]]
                         for v in client.search_model_versions(f"name = '{registered}'")})
        print(f"  {name:24s} log+register {spread(times[name])}; objects per model: {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small main (200 examples, 1 epoch)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-team-") as name, team.fresh_database() as database, \
            team.s3_store(Path(name)) as endpoint, team.tracking_server(database, endpoint, Path(name)) as url:
        folder = Path(name)
        data = quick_data(folder) if args.quick else ["--train_data", str(SQUAD_TRAIN),
                                                      "--validation_data", str(SQUAD_VALIDATION)]
        print(f"server {url} (PostgreSQL database {database}, artifacts s3://{team.BUCKET}/mlflow on {endpoint})")
        print(f"register a local model, {args.reps + 2} reps each:")
        bench_registration(url, endpoint, folder, args.reps + 2)
        print(f"main ({'quick' if args.quick else 'shipped data'}), {args.reps} reps each, interleaved:")
        times = bench_main(url, folder, args.reps, data)
    for name, seconds in times.items():
        print(f"  {name:26s} {spread(seconds)}")
    medians = [statistics.median(s) for s in times.values()]
    print(f"  server / sqlite (medians): {medians[1] / medians[0]:.2f}x")


if __name__ == "__main__":
    main()

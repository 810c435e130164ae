"""The search's "done when", end to end: `mlflow run . -e sweep -P config=experiments/search_local.yaml` and a second
worker (`-P join=true`) on this machine, one worker killed with -9 while its trial trains, then the checks: every
trial accounted for (completed, pruned, or failed and retried), a pruned trial's trainer stopped, no trial trained
twice (one local job per trial run), one registered version under the production name, and the report's history,
importances and distinguishability table on the parent. Minutes on 2 cores; not part of the test suite.

    python scripts/search_two_workers.py                         # journal file beside a fresh SQLite store
    python scripts/search_two_workers.py --postgres              # the study in a fresh PostgreSQL database on
                                                                 # 127.0.0.1:5432 (user postgres), the team setup
    python scripts/search_two_workers.py --config experiments/search_local.yaml --n-trials 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def postgres_database():
    import psycopg2

    admin = psycopg2.connect(dbname="postgres", host="127.0.0.1", port=5432, user="postgres", connect_timeout=5)
    admin.autocommit = True
    name = f"finetune_search_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/search_local.yaml")
    parser.add_argument("--n-trials", type=int, default=0, help="override sweep.n_trials (0: the file's)")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--folder", default="", help="where the store and logs go (default: a new temp folder)")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="search-two-workers-"))
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        document = yaml.safe_load((ROOT / args.config).read_text(encoding="utf-8"))
        document["experiment"] = "search-two-workers"
        document["sweep"]["study_name"] = f"two-workers-{uuid.uuid4().hex[:6]}"
        if args.n_trials:
            document["sweep"]["n_trials"] = args.n_trials
        if args.postgres:
            document["sweep"]["storage"] = stack.enter_context(postgres_database())
        config = folder / "search.yaml"
        config.write_text(yaml.safe_dump(document), encoding="utf-8")
        return run(folder, config, document)


def run(folder: Path, config: Path, document: dict) -> int:
    import optuna
    from mlflow.tracking import MlflowClient

    from finetune_mlflow.liveness import pid_alive
    from finetune_mlflow.search.study import default_journal, open_storage

    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    # Artifacts in the folder too (the steps run in the repository, where ./mlruns would be the default).
    os.chdir(folder)
    MlflowClient(tracking).create_experiment(document["experiment"], artifact_location=str(folder / "artifacts"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "FINETUNE_MLFLOW_HOME": str(folder / "home"),
           "PYTHONPATH": str(ROOT)}
    command = ["mlflow", "run", str(ROOT), "-e", "sweep", "-P", f"config={config}", "--env-manager", "local"]
    name = document["sweep"]["study_name"]
    storage = document["sweep"].get("storage") or default_journal(tracking, name)
    started = time.monotonic()
    logs = contextlib.ExitStack()
    first_log = logs.enter_context((folder / "worker1.log").open("wb"))
    second_log = logs.enter_context((folder / "worker2.log").open("wb"))
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=first_log, stderr=subprocess.STDOUT)

    def study():
        return optuna.load_study(study_name=name, storage=open_storage(storage))

    def ready():
        with contextlib.suppress(Exception):
            return study().user_attrs.get("ready")
        return False

    while not ready():
        assert first.poll() is None, (folder / "worker1.log").read_text()[-3000:]
        time.sleep(1)
    second = subprocess.Popen(command + ["-P", "join=true"], cwd=ROOT, env=env, stdout=second_log,
                              stderr=subprocess.STDOUT)
    mlflow = MlflowClient(tracking)
    killed = None
    while killed is None:  # the joined worker's python process, once one of its trials has a job
        assert first.poll() is None, (folder / "worker1.log").read_text()[-3000:]
        for trial in study().get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            host_pid = str(trial.user_attrs.get("finetune.worker", ""))
            run_id = trial.user_attrs.get("run_id")
            worker = int(host_pid.rpartition(":")[2] or 0)
            if worker and worker != first.pid and run_id and "finetune.job_id" in mlflow.get_run(run_id).data.tags \
                    and _descends(worker, second.pid):
                killed = (trial.number, worker)
                break
        time.sleep(0.5)
    os.kill(killed[1], signal.SIGKILL)
    print(f"kill -9 of worker pid {killed[1]} while trial {killed[0]} trains", flush=True)
    codes = (first.wait(), second.wait())
    logs.close()
    wall = time.monotonic() - started
    trials = study().get_trials()
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                              "tags.`finetune.step` = 'tune'")
    jobs = [p.name for p in (folder / "home" / "local-jobs").iterdir()]
    pruned = [r for r in runs if r.info.status == "KILLED" and "finetune.pruned_step" in r.data.tags]
    stopped = all(not pid_alive(json.loads((folder / "home" / "local-jobs" / r.data.tags["finetune.job_id"] /
                                            "pid.json").read_text())["pid"]) for r in pruned)
    production = document["tune"].get("registered_model_name") or "squad-qa-local"
    versions = mlflow.search_model_versions(f"name = '{production}'")
    parent = next(r for r in mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                                "tags.`finetune.step` = 'sweep'"))
    artifacts = {a.path for a in mlflow.list_artifacts(parent.info.run_id, "search")}
    checks = {
        "exit codes (worker 1, the killed worker 2's mlflow run)": codes,
        "trials complete/pruned/failed": states,
        "retried after the kill": [t.system_attrs["failed_trial"] for t in retried],
        "every trial accounted for": len([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]) ==
        document["sweep"]["n_trials"],
        "pruned trials with their trainer stopped": (len(pruned), stopped),
        "no trial trained twice (jobs == tune runs)": (len(jobs), len(runs), len(set(jobs)) == len(runs)),
        "registered versions of the production name": len(versions),
        "report artifacts": sorted(artifacts),
        "runs left RUNNING": len(mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                                    "attributes.status = 'RUNNING'")),
        "wall seconds": round(wall),
        "store": tracking,
    }
    print(json.dumps(checks, indent=2, default=str))
    ok = (codes[0] == 0 and checks["every trial accounted for"] and pruned and stopped and len(versions) == 1
          and len(set(jobs)) == len(runs) and "search/importances.png" in artifacts and retried
          and checks["runs left RUNNING"] == 0)
    return 0 if ok else 1


def _descends(pid: int, ancestor: int) -> bool:
    """Whether `pid` is `ancestor` or one of its descendants (the joined worker runs under its `mlflow run`)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        pid = int(stat[1])
    return False


if __name__ == "__main__":
    sys.exit(main())

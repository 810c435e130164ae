"""The sweep parent owns its children, through real processes and real signals: grid values are refused as the
child would refuse them, a child killed -9 is ended by the parent, SIGTERM stops the parent without waiting for
jobs, a rerun after kill -9 watches the orphans instead of failing them, and only the winner is registered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main as cli_main
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.sweep_plan import MAX_GRID_POINTS, plan_sweep
from tests.conftest import ROOT
from tests.e2e_support import start_cli, wait_for


@pytest.mark.parametrize(("grid", "extra", "message"), [
    ("{epochs: [1, ~]}", "", "None is not a value for tune.epochs"),
    ("{epochs: [{a: 1}]}", "", "is not a value for tune.epochs"),
    ("{epochs: [[1, 2]]}", "", "is not a value for tune.epochs"),
    ("{epochs: ['']}", "", "is not a value for tune.epochs"),
    ("{learning_rate: [0.01, 1e-2]}", "", "lists a value twice: '1e-2' is 0.01 as tune.learning_rate"),
    ("{epochs: [2, '2']}", "", "lists a value twice"),
    ("{epochs: [1, 2], tune.epochs: [3]}", "", "sweep.grid lists 'epochs' and 'tune.epochs', both tune.epochs"),
    ("{epochs: [0]}", "", "tune.epochs is 0; expected >= 1"),
    ("{learning_rate: [.nan]}", "", "expected a finite number"),
    ("{epochs: ['two']}", "", "expected int, got 'two'"),
    ("{tune.seed: [true]}", "", "expected a number, got True"),
    ("{local.no_such_knob: [1]}", "", "unknown key 'local.no_such_knob'"),
    ("{epochs: [1, 2, 3]}", "  max_grid_points: 100000", f"expected at most {MAX_GRID_POINTS}"),
    ("{tune.provider: [local, nope]}", "", "unknown provider 'nope'"),
])
def test_a_grid_value_the_child_would_refuse_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, grid,
                                                                             extra, message):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "sweep.yaml"
    path.write_text(f"tune: {{provider: local}}\nsweep:\n  grid: {grid}\n{extra}\n", encoding="utf-8")
    assert cli_main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0] and "Traceback" not in err, err
    assert MlflowClient().search_runs(["0"]) == []  # no run, no job


def test_a_huge_grid_is_counted_not_built():
    # 3^40 points under a cap that allows them would fill memory if enumerated; refused at once by its count.
    block = {"grid": {"epochs": [1, 2, 3], **{f"local.k{i}": [1, 2, 3] for i in range(39)}},
             "max_grid_points": MAX_GRID_POINTS}
    with pytest.raises(ConfigError, match=r"has 12157665459056928801 points, over sweep.max_grid_points=1000"):
        plan_sweep(block, "s.yaml")


def test_an_unpriced_model_under_a_cost_limit_launches_nothing(tmp_path, small_squad, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    train, validation = small_squad
    path = tmp_path / "openai_sweep.yaml"
    path.write_text(f"""
data: {{train_data: {train}, validation_data: {validation}, max_examples: 50}}
tune: {{provider: openai, base_model: gpt-4o-mini-2024-07-18}}
openai: {{base_url: "http://127.0.0.1:9/v1"}}
sweep:
  grid: {{epochs: [1, 2]}}
  max_cost_usd: 0.01
""", encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-sweep0123456789abcdef")
    assert cli_main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "max_cost_usd is 0.01 but the cost of the sweep's 2 jobs" in err and "cannot be estimated" in err, err
    runs = MlflowClient().search_runs(["0"])
    assert not [r for r in runs if r.data.tags.get("finetune.step") == "tune"]  # nothing launched
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED"}


def _sweep_file(tmp_path: Path, small_squad) -> Path:
    train, validation = small_squad
    path = tmp_path / "sweep.yaml"
    # Batch 4 for 12-13 epochs: ~600 steps, so the jobs are still training when the test freezes them (each job
    # is frozen as soon as its trainer's pid is written, before the child has even tagged its run).
    path.write_text(f"""
data: {{train_data: {train}, validation_data: {validation}, max_examples: 200}}
tune: {{provider: local, batch_size: 4, poll_interval: 0.1}}
evaluate: {{max_concurrency: 1, bootstrap_samples: 100, trace_samples: 0}}
sweep:
  grid: {{epochs: [12, 13]}}
  max_parallel_jobs: 2
""", encoding="utf-8")
    return path


def _children(parent_id: str) -> list:
    runs = MlflowClient().search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted((r for r in runs if r.data.tags.get("finetune.step") == "tune"),
                  key=lambda r: r.data.tags["finetune.sweep_point"])


def _pid(run) -> int:
    return int(run.data.tags["finetune.owner"].rpartition(":")[2])


def _freeze_new_trainers(frozen: dict[str, int]) -> None:
    """SIGSTOP every local job's trainer not yet frozen, as soon as its pid is on disk."""
    for launched in (Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs").glob("*/launch.json"):
        job_id = launched.parent.name
        if job_id not in frozen:
            try:
                frozen[job_id] = json.loads(launched.read_text())["pid"]
            except ValueError:  # being written
                continue
            os.kill(frozen[job_id], signal.SIGSTOP)


def _alive(proc: subprocess.Popen, log: Path):
    if proc.poll() is not None:
        raise AssertionError(f"the sweep exited ({proc.returncode}) early:\n{log.read_text(errors='replace')[-4000:]}")


def test_sigterm_kill_9_and_reruns_leave_no_child_running_and_register_only_the_winner(tmp_path, small_squad,
                                                                                      monkeypatch):
    monkeypatch.chdir(ROOT)
    config = _sweep_file(tmp_path, small_squad)
    client = MlflowClient()
    frozen: dict[str, int] = {}  # job id -> its trainer's pid, stopped
    started: list[subprocess.Popen] = []

    def sweep(name: str) -> tuple[subprocess.Popen, Path]:
        started.append(start_cli(["sweep", "--config", str(config)], tmp_path / name))
        return started[-1], tmp_path / name
    try:
        # 1. Both children launched their jobs; the jobs are frozen so the children stay at work.
        first, log = sweep("sweep-1.log")

        def launched():
            _alive(first, log)
            _freeze_new_trainers(frozen)
            parents = client.search_runs(["0"], "tags.`finetune.step` = 'sweep'")
            children = _children(parents[0].info.run_id) if parents else []
            ready = [c for c in children if c.data.tags.get("finetune.job_id") and c.data.tags.get("finetune.owner")]
            return ready if len(ready) == 2 and len(frozen) == 2 else None
        children = wait_for(launched, first, log, interval=0.02, what="both children's jobs")
        parent_id = children[0].data.tags["mlflow.parentRunId"]

        # 2. One child's tune process killed -9: the parent ends its run, with the reason, and goes on.
        killed, other = children
        os.kill(_pid(killed), signal.SIGKILL)
        wait_for(lambda: _alive(first, log) or client.get_run(killed.info.run_id).info.status != "RUNNING",
                 first, log, what="the parent ending the killed child's run")
        ended = client.get_run(killed.info.run_id)
        assert ended.info.status == "KILLED" and "tune process killed by SIGKILL" in ended.data.tags[
            "finetune.end_reason"]

        # 3. SIGTERM to the parent alone: it stops watching at once (the jobs are frozen, so waiting for them
        #    would never end), its running child ends KILLED, and the parent ends after every child.
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text(errors="replace")[-4000:]
        runs = client.search_runs(["0"])
        assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
        parent = client.get_run(parent_id)
        assert parent.info.status == "KILLED"
        for child in _children(parent_id):
            assert child.info.status == "KILLED" and child.data.tags["finetune.end_reason"]
            assert child.info.end_time <= parent.info.end_time
        assert "SIGTERM" in client.get_run(other.info.run_id).data.tags["finetune.end_reason"]

        # 4. A rerun reattaches both children to their jobs; it is killed -9 while they wait on the frozen jobs.
        monkeypatch.setenv("MLFLOW_RUN_ID", parent_id)  # what `mlflow run --run-id <parent>` does
        second, log2 = sweep("sweep-2.log")
        old = {_pid(killed), _pid(other)}

        def reattached():
            _alive(second, log2)
            now = _children(parent_id)
            return now if all(c.info.status == "RUNNING" and c.data.tags.get("finetune.owner")
                              and _pid(c) not in old for c in now) else None
        orphans = wait_for(reattached, second, log2, what="the rerun reattaching both children")
        os.kill(second.pid, signal.SIGKILL)
        second.wait(timeout=60)

        # 5. A second rerun finds both children still owned by live processes: it watches them, never fails or
        #    relaunches them; the jobs resume and the sweep finishes with every child FINISHED.
        third, log3 = sweep("sweep-3.log")
        wait_for(lambda: _alive(third, log3) or log3.read_text(errors="replace").count(": watching it") == 2,
                 third, log3, what="the rerun watching both orphans")
        for pid in frozen.values():
            os.kill(pid, signal.SIGCONT)
        frozen.clear()
        assert third.wait(timeout=600) == 0, log3.read_text(errors="replace")[-4000:]
    finally:
        for pid in frozen.values():
            os.kill(pid, signal.SIGCONT)
        for proc in started:  # each sweep's group holds its tune children, orphaned ones included
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)

    out = log3.read_text(errors="replace")
    assert "FAILED" not in out and "in use" not in out, out[-4000:]
    finished = _children(parent_id)
    assert [c.info.status for c in finished] == ["FINISHED", "FINISHED"]
    assert {c.info.run_id for c in finished} == {c.info.run_id for c in orphans}  # the same runs, no new ones
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep_n_failed"] == 0
    assert len(os.listdir(Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs")) == 2  # no second job
    # Children logged their models; only the winner became a version.
    versions = client.search_model_versions("name = 'squad-qa-local'")
    assert [v.run_id for v in versions] == [parent.data.tags["finetune.winner_run_id"]]
    assert parent.data.tags["finetune.registered_version"] == f"squad-qa-local/{versions[0].version}"
    loser = next(c for c in finished if c.info.run_id != versions[0].run_id)
    assert "finetune.registered_version" not in loser.data.tags
    assert client.search_logged_models(["0"], filter_string=f"source_run_id = '{loser.info.run_id}'")


def test_sweeps_starting_together_on_a_fresh_sqlite_store_each_get_past_its_creation(tmp_path, small_squad,
                                                                                    monkeypatch):
    """Three sweeps on a database that does not exist yet: each gets as far as its own cost guard (an unpriced
    model under a limit, so no job is ever launched), none dies in MLflow's schema creation."""
    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-sweep0123456789abcdef")
    train, validation = small_squad
    path = tmp_path / "openai_sweep.yaml"
    path.write_text(f"""
data: {{train_data: {train}, validation_data: {validation}, max_examples: 50}}
tune: {{provider: openai, base_model: gpt-4o-mini-2024-07-18}}
openai: {{base_url: "http://127.0.0.1:9/v1"}}
sweep: {{grid: {{epochs: [1, 2]}}, max_cost_usd: 0.01}}
""", encoding="utf-8")
    processes = [subprocess.Popen([sys.executable, "-m", "finetune_mlflow", "sweep", "--config", str(path)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [(p.communicate(timeout=600)[0], p.returncode) for p in processes]
    for out, code in outputs:
        assert code == 2 and "cannot be estimated" in out and "Traceback" not in out, out[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    parents = client.search_runs(["0"], "tags.`finetune.step` = 'sweep'")
    assert len(parents) == 3 and {p.info.status for p in parents} == {"FAILED"}

"""Vertex, round two, through `cli.main` against the fake server (real google-genai client): an adapter size the
base model does not document is refused before any upload or job, a job that succeeds without a single curve
point says so (tag, warning, the resources tried), `cancel -P job_id=N` sends `tuningJobs/N:cancel`, and a job id
that is a path is refused before any request."""

from __future__ import annotations

import json
import urllib.request

from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main
from tests.fakes.vertex_server import JobScript
from tests.test_bad_input import all_runs
from tests.test_e2e_vertex import MODEL_NAME, PROJECT, TOKEN, config_file, fake, tune_parameters  # noqa: F401

LOCATION = "us-central1"


def tune_args(config_file, small_squad, *extra: str) -> list[str]:
    parameters = tune_parameters(config_file, small_squad)
    return ["tune", *[f"--{k}={v}" for k, v in parameters.items()], *extra]


def test_undocumented_adapter_size_is_refused_before_any_request(fake, config_file, small_squad, capsys):
    assert main(tune_args(config_file, small_squad, "--set", "vertex.adapter_size=32")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: vertex.adapter_size is 32, but gemini-2.5-flash supports adapter sizes 1, 2, 4, 8, 16 "
                      "(or 0 for Vertex's default)"]
    assert fake.created_jobs == [] and fake.objects == {}
    assert {r.info.status for r in all_runs()} <= {"FAILED"}


def test_job_without_curve_points_is_said_loudly(fake, config_file, small_squad, caplog):
    fake.script_next_job(JobScript(series={}))
    assert main(tune_args(config_file, small_squad)) == 0
    (run,) = [r for r in all_runs() if r.data.tags.get("finetune.step") == "tune"]
    assert run.data.tags["finetune.curves"] == "none found"
    tried = run.data.tags["finetune.curves_tried"]
    assert "/tensorboards/" in tried and tried.endswith("/timeSeries")
    assert "no training curve was found" in caplog.text
    assert MlflowClient().get_metric_history(run.info.run_id, "train_loss") == []




def test_cancel_by_bare_job_number_and_path_ids_refused(fake, config_file, small_squad, capsys):
    request = urllib.request.Request(
        f"{fake.url}/v1/projects/{PROJECT}/locations/{LOCATION}/tuningJobs", method="POST",
        data=json.dumps({"baseModel": "gemini-2.5-flash", "supervisedTuningSpec": {}}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    name = json.loads(urllib.request.urlopen(request, timeout=10).read())["name"]
    number = name.rsplit("/", 1)[-1]
    assert main(["cancel", "--config", str(config_file), "--job_id", number]) == 0
    assert name in capsys.readouterr().out
    assert ("POST", f"/v1beta1/{name}:cancel") in fake.requests or ("POST", f"/v1/{name}:cancel") in fake.requests
    before = len(fake.requests)
    for bad in ("../../etc/passwd", f"{name}/../../x", "projects/p/locations/l/tuningJobs/1:cancel"):
        assert main(["sync", "--config", str(config_file), "--job_id", bad]) == 2
        assert "is not a vertex job id" in capsys.readouterr().err
    assert len(fake.requests) == before


def test_a_curve_longer_than_ten_thousand_points_is_read_whole(fake, config_file, small_squad):
    """`:read` would sample it at random; the export pages through every point (served here in reverse order)."""
    steps = range(1, 12_501)
    fake.script_next_job(JobScript(series={"/train_total_loss": [(s, 1.0 / s) for s in steps]}))
    assert main(tune_args(config_file, small_squad)) == 0
    (run,) = [r for r in all_runs() if r.data.tags.get("finetune.step") == "tune"]
    history = MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(steps)
    assert "finetune.curves" not in run.data.tags
    assert not any(path.endswith(":read") for _, path in fake.requests)

"""Together through `cli.main` in-process (real `together` SDK, loopback fake): a setting the model's limits
refuse is one `error:` line before any upload or job, and a job that ends without a single loss point says so."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from finetune_mlflow.cli import main
from tests.fakes.together_server import JobScript
from tests.test_bad_input import all_runs
from tests.test_e2e_together import CONFIG, together_fake  # noqa: F401


def tune_args(small_squad, *extra: str) -> list[str]:
    train, validation = small_squad
    return ["tune", "--config", CONFIG, "--train_data", str(train), "--validation_data", str(validation),
            "--max_examples", "30", "--max_validation_examples", "10", "--poll_interval", "0.05", *extra]


def test_a_rank_above_the_models_limit_is_one_error_line_before_any_upload(together_fake, small_squad, capsys):
    assert main(tune_args(small_squad, "--set", "together.lora_r=128")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "together.lora_r=128 is outside" in errors[0] and "1..64" in errors[0]
    assert [path for _, path, _ in together_fake.requests] == ["/v1/fine-tunes/models/limits"]
    assert together_fake.created_jobs == []
    runs = all_runs()
    assert "RUNNING" not in {r.info.status for r in runs}  # prepare may have finished; tune did not launch
    assert {r.info.status for r in runs if r.data.tags.get("finetune.step") == "tune"} == {"FAILED"}


def test_a_job_without_loss_points_is_said_loudly(together_fake, small_squad, caplog):
    together_fake.script_next_job(JobScript(statuses=["pending", "running", "completed"], n_steps=0))
    assert main(tune_args(small_squad)) == 0
    (run,) = [r for r in all_runs() if r.data.tags.get("finetune.step") == "tune"]
    assert run.data.tags["finetune.curves"] == "none found"
    assert "/metrics" in run.data.tags["finetune.curves_tried"]
    assert "no training curve was found" in caplog.text
    assert MlflowClient().get_metric_history(run.info.run_id, "train_loss") == []

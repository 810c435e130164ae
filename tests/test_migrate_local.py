"""The local migration example, test-sized and in-process: tune and promote a champion whose version retires on a
dated entry, refuse to migrate on prompts never captured, capture its answers on unlabelled prompts, migrate to the candidate that is not worse, rerun without
launching anything; the retiring version is warned about when evaluated and when its pyfunc loads."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from finetune_mlflow import cli
from tests import e2e_support as e2e

NAME = "squad-qa-migrate-test"


def local_config(tmp_path: Path, small_squad) -> tuple[str, Path]:
    config = yaml.safe_load((e2e.ROOT / "experiments" / "migrate_local.yaml").read_text())
    train, validation = small_squad
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in Path(e2e.ROOT / "data" / "migrate" / "prompts.jsonl").read_text().splitlines()]
    prompts.write_text("".join(json.dumps({"question": r["question"], "context": r["context"]}) + "\n"
                               for r in rows[:8]))
    config["data"].update(train_data=str(train), validation_data=str(validation), max_examples=0,
                          max_validation_examples=60)
    config["tune"].update(registered_model_name=NAME, poll_interval=0.05, epochs=2)
    config["evaluate"].update(bootstrap_samples=100, trace_samples=0)
    config["lifecycle"]["models"] = {  # the base model's date, and a sooner one for version 1 itself
        "span-ranker-base": {"shutdown_date": "2099-01-01", "source": "base notice", "as_of": "2026-12-01"},
        f"models:/{NAME}/1": {"shutdown_date": "2098-06-01", "source": "v1 notice", "as_of": "2026-12-01"}}
    config["lifecycle"]["warn_days"] = 36_500  # the dated entry is far away: warned about all the same
    config["migration"].update(prompts=str(prompts), max_f1_loss=10.0, max_agreement_loss=60.0, candidates=[
        {"provider": "local", "base_model": "span-ranker-base", "epochs": 2, "tune.seed": 1},  # a near twin
        {"provider": "local", "base_model": "span-ranker-base", "epochs": 1, "learning_rate": 0.00001}])
    path = tmp_path / "migrate_local_test.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), prompts


def cli_ok(capsys, *args: str) -> str:
    capsys.readouterr()
    code = cli.main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def local_jobs() -> int:
    return len(list((Path(os.environ["FINETUNE_MLFLOW_HOME"]) / "local-jobs").glob("localjob-*")))


def test_local_migration_with_captured_prompts(small_squad, tmp_path, capsys, caplog):
    config, prompts = local_config(tmp_path, small_squad)
    client = MlflowClient()
    cli_ok(capsys, "tune", "--config", config)
    # Forced: on this test-sized data the champion's gain over the base model is not the point here.
    out = cli_ok(capsys, "promote", "--config", config, "--force", "true", "--reason", "test champion")
    assert "v1: promoted to champion" in out

    assert client.get_model_version(NAME, "1").tags["finetune.shutdown_date"] == "2099-01-01"  # at registration
    out = cli_ok(capsys, "lifecycle", "--config", config)
    assert out.splitlines()[1].split()[:5] == [NAME, "1", "champion", str(_days_to("2098-06-01")), "2098-06-01"]
    assert "v1 notice" in client.get_model_version(NAME, "1").tags["finetune.lifecycle_source"]

    capsys.readouterr()
    assert cli.main(["migrate", "--config", config]) == 2  # the champion's answers on the prompts are not recorded
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "were never captured" in err and "-e capture" in err
    assert local_jobs() == 1  # refused before any candidate was tuned

    out = cli_ok(capsys, "capture", "--config", config, "--model", f"models:/{NAME}@champion", "--prompts",
                 str(prompts))
    [capture] = client.search_runs(["0"], "tags.`finetune.step` = 'capture'")
    assert capture.data.tags["finetune.captured_model"] == f"models:/{NAME}/1"
    assert capture.data.metrics["capture_n"] == 8 and capture.inputs.dataset_inputs
    assert "reused" in cli_ok(capsys, "capture", "--config", config, "--model", f"models:/{NAME}/1", "--prompts",
                              str(prompts))

    out = cli_ok(capsys, "migrate", "--config", config)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "2" and champion.tags["migration.replaces"] == "1"
    assert "models:/squad-qa-migrate-test/1 (champion v1) shuts down on 2098-06-01" in out
    assert "v3 " in out and "fails: F1 delta lower bound" in out
    [migrate] = client.search_runs(["0"], "tags.`finetune.step` = 'migrate' and attributes.status = 'FINISHED'")
    report = Path(mlflow.artifacts.download_artifacts(run_id=migrate.info.run_id,
                                                      artifact_path="migration_report.md")).read_text()
    assert "| v1 | champion local/span-ranker-base |" in report and "100.00 [100.00, 100.00]" in report
    captures = client.search_runs(["0"], "tags.`finetune.step` = 'capture'")
    assert {r.data.tags["finetune.captured_model"] for r in captures} == {f"models:/{NAME}/{v}" for v in "123"}

    launched = local_jobs()
    edited = yaml.safe_load(Path(config).read_text())  # a new notice and a stricter gate retrain nothing
    edited["lifecycle"]["models"][f"models:/{NAME}/1"]["as_of"] = "2026-12-03"
    edited.setdefault("promotion", {})["min_days_to_shutdown"] = 60
    Path(config).write_text(yaml.safe_dump(edited))
    out = cli_ok(capsys, "migrate", "--config", config)
    assert "v2 is already champion" in out and local_jobs() == launched == 3

    caplog.set_level(logging.WARNING)
    cli_ok(capsys, "evaluate", "--config", config, "--model", f"models:/{NAME}/1")
    assert any("shuts down in" in r.getMessage() and "2098-06-01" in r.getMessage() for r in caplog.records)
    caplog.clear()
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@previous_champion", suppress_warnings=True)
    warned = [r.getMessage() for r in caplog.records if "shuts down in" in r.getMessage()]
    assert len(warned) == 1 and "span-ranker-base" in warned[0] and "2099-01-01" in warned[0]  # as registered
    assert len(model.predict(e2e_frame())) == 1  # a warning, never a failure


def e2e_frame():
    import pandas as pd

    return pd.DataFrame({"question": ["Who wrote it?"], "context": ["Ada Lovelace wrote it in 1843."]})


def _days_to(day: str) -> int:
    import datetime as dt

    return (dt.date.fromisoformat(day) - dt.date.today()).days

"""One registry version per distinct model: `tune` and then `main` on the same data and settings train the same
weights, and the registry keeps the first version for both; other settings make another version."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from finetune_mlflow.pipeline import run_main
from finetune_mlflow.steps.tune import run_tune
from tests.test_e2e_local import small_config


def test_tune_then_main_on_the_same_data_register_one_version(small_squad):
    settings = {"epochs": "1", "max_examples": "60"}
    tuned = run_tune(small_config(small_squad, **settings))
    main = run_main(small_config(small_squad, **settings))
    client = MlflowClient()
    versions = client.search_model_versions("name = 'squad-qa-local'")
    assert [str(v.version) for v in versions] == [str(tuned.version.version)] == ["1"]
    tunes = client.search_runs(["0"], "tags.`finetune.step` = 'tune'")
    assert len(tunes) == 2 and {r.data.tags["finetune.registered_version"] for r in tunes} == {"squad-qa-local/1"}
    assert main.candidate == "1"  # main's promote judged the version its tune run produced
    assert len(versions[0].tags["model_sha256"]) == 64
    other = run_tune(small_config(small_squad, **settings, learning_rate="0.02"))
    assert str(other.version.version) == "2"

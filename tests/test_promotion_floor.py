"""Nothing worse than the base model is promoted, champion or not: `main` with a deliberately poor model (a few
examples, a huge step) and no champion yet keeps the alias unset and says why."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_mlflow.pipeline import run_main
from tests import e2e_support as e2e
from tests.test_e2e_local import small_config


def test_a_model_worse_than_base_is_not_promoted_even_without_a_champion(small_squad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_main(small_config(small_squad, epochs="1", max_examples="40", learning_rate="1.0"))
    client = MlflowClient()
    (tune,) = client.search_runs(["0"], "tags.`finetune.step` = 'tune'")
    tuned, base = tune.data.metrics["eval_f1"], e2e.base_metrics(tune.info.run_id)["eval_f1"]
    assert tuned < base, f"the setup must produce a worse model (tuned {tuned:.1f}, base {base:.1f})"
    assert not result.decision.promote
    assert "base model" in result.decision.reason
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("squad-qa-local", "champion")

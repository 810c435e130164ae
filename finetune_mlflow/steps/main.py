"""main: prepare -> evaluate (base) -> tune -> promote, each a child run of one parent run.

Parameters in: the same as `tune`. A finished prepare run with the same data fingerprint and git commit is
reused (`search_runs` on `finetune.data_sha256` and `finetune.git_commit`), as is a finished base evaluation of
the same data; tune is never reused: it costs money. Tags on the parent: `finetune.tune_run_id`,
`finetune.registered_version`, `promotion.decision`.
"""

from __future__ import annotations

import mlflow

from finetune_mlflow.config import Config
from finetune_mlflow.providers import get_provider
from finetune_mlflow.steps.evaluate import base_evaluation
from finetune_mlflow.steps.prepare import ensure_prepared
from finetune_mlflow.steps.promote import PromoteResult, run_promote
from finetune_mlflow.steps.tune import run_tune
from finetune_mlflow.tracking import step_run


def run_main(config: Config) -> PromoteResult:
    with step_run("main", run_name="main"):
        prepared = ensure_prepared(config)
        base_evaluation(config, prepared, get_provider(config.tune.provider, config))
        tuned = run_tune(config)
        promoted = run_promote(config, model_name=tuned.version.name, version=tuned.version.version)
        mlflow.set_tags({"finetune.tune_run_id": tuned.run_id,
                         "finetune.registered_version": f"{tuned.version.name}/{tuned.version.version}",
                         "promotion.decision": "promote" if promoted.decision.promote else "keep"})
        return promoted

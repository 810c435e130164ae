"""main: prepare -> evaluate (base) -> tune -> promote, each a child run of one `main` parent run.

Each step is called once and handed what the previous one produced (the prepared data's `runs:/` URI and local
copy, the base evaluation, the registered version), as MLflow's multistep example does. prepare and the base
evaluation are reused when a finished run with the same data fingerprint and code exists; tune never is (it
costs money). The parent carries the headline: `eval_f1`, `eval_exact_match`, their `base_` values,
`eval_f1_delta` with its interval, the promotion decision, and a one-line description.
"""

from __future__ import annotations

import mlflow

from finetune_mlflow.config import Config
from finetune_mlflow.preparation import ensure_prepared
from finetune_mlflow.providers import get_provider
from finetune_mlflow.report import log_children_report
from finetune_mlflow.scoring import base_evaluation
from finetune_mlflow.steps.promote import PromoteResult, run_promote
from finetune_mlflow.steps.tune import run_tune
from finetune_mlflow.summary import HEADLINE_METRICS, describe_tune
from finetune_mlflow.tracking import log_values, step_run


def run_main(config: Config) -> PromoteResult:
    with step_run("main", run_name=config.run_name("main")) as run:
        log_values(mlflow.tracking.MlflowClient(), run.info.run_id, params=config.run_params())
        prepared = ensure_prepared(config)
        base = base_evaluation(config, prepared, get_provider(config.tune.provider, config))
        tuned = run_tune(config, prepared=prepared, base=base)
        promoted = run_promote(config, model_name=tuned.version.name, version=tuned.version.version)
        decision = "promote" if promoted.decision.promote else "keep"
        headline = {k: v for k, v in tuned.metrics.items() if k in HEADLINE_METRICS}
        log_values(mlflow.tracking.MlflowClient(), run.info.run_id, metrics=headline, tags={
            "finetune.tune_run_id": tuned.run_id, "promotion.decision": decision,
            "finetune.registered_version": f"{tuned.version.name}/{tuned.version.version}",
            "mlflow.note.content": f"{describe_tune(tuned.metrics, tuned.job.job_id)}; promotion: {decision} "
                                   f"({promoted.decision.reason})"})
        log_children_report(run.info.run_id)
        return promoted

"""evaluate: score a model reference on the prepared validation split with SQuAD v1.1 EM/F1.

Parameters in: `config`, `model` (`base`; `models:/<name>/<version>` or `models:/<name>@<alias>`; `runs:/<run_id>`
for the model a tune run logged; or any model id of the configured provider, such as an existing `ft:` model),
and the data overrides (which prepared data to use). Metrics and the per-example table: see `scoring`. Tags:
`finetune.step=evaluate`, `finetune.model_ref`, `finetune.provider`, `finetune.base_model`, `finetune.data_sha256`,
and for a `models:/` reference `finetune.model_version` (`<name>/<version>`, the version an alias stood for), also on
the evaluation's trace.
"""

from __future__ import annotations

import dataclasses
import logging

from finetune_mlflow.config import Config
from finetune_mlflow.preparation import data_fingerprint, ensure_prepared
from finetune_mlflow.scoring import Evaluation, base_evaluation_keys, evaluate_and_log, resolve_model, load_rows
from finetune_mlflow.tracking import find_finished_run, step_run

logger = logging.getLogger(__name__)
VERSION_TAG = "finetune.model_version"


def run_evaluate(config: Config, model: str) -> Evaluation:
    """The `evaluate` entry point: this run is the evaluation; prepare runs nested under it if needed."""
    resolved = resolve_model(model, config)
    fingerprint = data_fingerprint(config)
    tags = {"finetune.model_ref": model, "finetune.provider": resolved.provider.name,
            "finetune.base_model": resolved.base_model, "finetune.data_sha256": fingerprint,
            "finetune.eval_config_sha256": config.sha256("evaluate")}
    version_tags = {VERSION_TAG: resolved.version} if resolved.version else {}
    if resolved.version and resolved.version != model.removeprefix("models:/"):
        logger.info("%s is %s", model, resolved.version)
    tags.update(version_tags)
    shown = f"{model} (v{resolved.version.rpartition('/')[2]})" if "@" in model and resolved.version else model
    with step_run("evaluate", run_name=f"eval {shown}", tags=tags) as run:
        prepared = ensure_prepared(config, fingerprint)
        baseline = None
        if model != "base" and resolved.base_model:
            base_run = find_finished_run(run.info.experiment_id, step="evaluate",
                                         **base_evaluation_keys(config, resolved.provider, resolved.base_model,
                                                                fingerprint))
            baseline = load_rows(base_run.info.run_id) if base_run else None
        evaluation = evaluate_and_log(resolved.provider, resolved.model_id, prepared.split("validation"), config,
                                      baseline, trace_tags=version_tags)
        return dataclasses.replace(evaluation, model_version=resolved.version)

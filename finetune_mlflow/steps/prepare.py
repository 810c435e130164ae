"""prepare: raw QA data -> clean, deduplicated, validated splits in every provider's tuning format.

Parameters in: `config` and the data overrides (`finetune-mlflow prepare --help`). Artifacts, metrics, params
and dataset inputs: see `preparation`. Always prepares anew (the other steps reuse a matching prepare run).
"""

from __future__ import annotations

from finetune_mlflow.config import Config
from finetune_mlflow.preparation import Prepared, prepare_data


def run_prepare(config: Config) -> Prepared:
    return prepare_data(config)

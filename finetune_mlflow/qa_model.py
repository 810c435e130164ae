"""The registered model: a pyfunc that answers `question` + `context` through the provider that tuned it.

Logged "from code" (`serving.py`), never pickled: the version stores the provider name, the tuned model id and
the provider's non-secret settings; credentials come from the serving environment, as they do for `tune`.
For the local provider the version carries the trained weights as an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from finetune_mlflow.config import LifecycleConfig
from finetune_mlflow.lifecycle_record import warn_if_retiring
from finetune_mlflow.providers.base import MODEL_ARTIFACT
from finetune_mlflow.request_limits import FIELDS, RequestRefused, question_pairs
from finetune_mlflow.served import SERVING_ARTIFACT, served_model


class QAModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        serving = context.artifacts.get(SERVING_ARTIFACT)
        # Versions logged before `serving.json` kept the settings as the pyfunc's model_config.
        settings = (json.loads(Path(serving).read_text(encoding="utf-8")) if serving
                    else dict(context.model_config or {}))
        self.provider_name: str = settings["provider"]
        self.model_id, self.provider = served_model(settings, context.artifacts.get(MODEL_ARTIFACT))
        lifecycle = settings.get("lifecycle") or {}
        # A log line, never a failure: the model answers until the provider turns it off.
        warn_if_retiring(f"serving {self.provider_name} model {self.model_id}", lifecycle,
                         int(lifecycle.get("warn_days", LifecycleConfig().warn_days)))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        columns = list(model_input.columns)
        try:
            rows = (list(zip(*(model_input[field].tolist() for field in FIELDS)))
                    if set(FIELDS) <= set(columns) else [])
            pairs = question_pairs(columns, rows)
        except RequestRefused as e:  # a 400 from the scoring server, before any work
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(e)) from None
        # One batched generation where the provider has one (transformers); row after row otherwise.
        predictions = self.provider.predict_batch(self.model_id, pairs)
        return pd.DataFrame({"answer": [prediction.text for prediction in predictions]})

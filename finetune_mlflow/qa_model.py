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

from finetune_mlflow.config import load_config
from finetune_mlflow.providers import get_provider, provider_class
from finetune_mlflow.providers.base import MODEL_ARTIFACT


class QAModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        serving = context.artifacts.get("serving")
        settings = json.loads(Path(serving).read_text(encoding="utf-8")) if serving else dict(context.model_config or {})
        self.provider_name: str = settings["provider"]
        overrides = {**settings.get("provider_settings", {}), "provider": self.provider_name}
        self.model_id: str = settings["model_id"]
        shipped = context.artifacts.get(MODEL_ARTIFACT)
        if shipped:  # the model travels inside the version (local weights, a merged transformers model)
            self.model_id, located = provider_class(self.provider_name).model_from_artifact(shipped)
            overrides.update(located)
        config = load_config(None, overrides)
        self.provider = get_provider(self.provider_name, config)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = {"question", "context"} - set(model_input.columns)
        if missing:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"input needs columns question and context; missing {', '.join(sorted(missing))}")
        pairs = [(str(q), str(c)) for q, c in zip(model_input["question"], model_input["context"])]
        if self.provider.batched_prediction:  # one batched generation (a GPU batch) instead of row after row
            predictions = self.provider.predict_batch(self.model_id, pairs)
        else:
            predictions = [self.provider.predict(self.model_id, question, passage) for question, passage in pairs]
        return pd.DataFrame({"answer": [prediction.text for prediction in predictions]})

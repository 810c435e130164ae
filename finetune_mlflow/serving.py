"""Model-from-code entry file for `mlflow.pyfunc.log_model(python_model=<this file>)`; MLflow executes it."""

import mlflow

from finetune_mlflow.qa_model import QAModel

mlflow.models.set_model(QAModel())

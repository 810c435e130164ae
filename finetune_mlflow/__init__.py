"""finetune-mlflow: prepare, tune, evaluate and promote fine-tuned QA models, every step tracked in MLflow."""

__version__ = "0.1.0"

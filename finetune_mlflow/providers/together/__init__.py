"""Together AI LoRA fine-tuning through the official `together` SDK (imported by `provider.py` only)."""

from __future__ import annotations

from finetune_mlflow.providers.together.data import to_together_chat

PROVIDER_CLASS = "finetune_mlflow.providers.together.provider:TogetherProvider"
TRAINING_RECORD = to_together_chat

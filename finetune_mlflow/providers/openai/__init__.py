"""OpenAI fine-tuning jobs through the official `openai` SDK (imported by `provider.py` only)."""

from __future__ import annotations

from finetune_mlflow.providers.openai.data import to_openai_chat

PROVIDER_CLASS = "finetune_mlflow.providers.openai.provider:OpenAIProvider"
TRAINING_RECORD = to_openai_chat

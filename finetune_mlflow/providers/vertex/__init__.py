"""Vertex AI Gemini supervised tuning through google-genai, staged in Cloud Storage (SDKs imported by `provider.py`)."""

from __future__ import annotations

from finetune_mlflow.providers.vertex.data import to_gemini

PROVIDER_CLASS = "finetune_mlflow.providers.vertex.provider:VertexProvider"
TRAINING_RECORD = to_gemini

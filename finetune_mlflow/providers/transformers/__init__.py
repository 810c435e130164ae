"""The `transformers` provider: LoRA fine-tuning of an open-weights causal LM with Hugging Face (trl + peft).

torch, transformers, peft and trl come from the optional extra `pip install -e '.[transformers]'`; they are imported
inside functions, so the rest of the project (and `get_provider` for other providers) never needs them.
"""

from __future__ import annotations

from typing import Any, Mapping

from finetune_mlflow.prompt import chat_messages, training_answer

PROVIDER_CLASS = "finetune_mlflow.providers.transformers.provider:TransformersProvider"


def to_chat_record(example: Mapping[str, Any]) -> dict[str, Any]:
    """prepared/transformers/*.jsonl: the shared chat conversation (loss on the assistant turn only)."""
    return {"messages": chat_messages(example["question"], example["context"], training_answer(example["answers"]))}


TRAINING_RECORD = to_chat_record

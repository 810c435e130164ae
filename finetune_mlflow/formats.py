"""Pure conversions from canonical examples to each provider's tuning JSONL record."""

from __future__ import annotations

from typing import Any

from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt

# Subdirectory of `prepared/` -> record builder. Canonical files sit at the top of `prepared/`.
PREPARED_SPLITS = ("train", "validation")


def training_answer(example: dict[str, Any]) -> str:
    """The target a model is tuned on: the first gold answer, as SQuAD training conventionally does."""
    return example["answers"][0]


def to_openai_chat(example: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_INSTRUCTION},
            {"role": "user", "content": user_prompt(example["question"], example["context"])},
            {"role": "assistant", "content": training_answer(example)},
        ]
    }


def to_gemini(example: dict[str, Any]) -> dict[str, Any]:
    return {
        "systemInstruction": {"role": "system", "parts": [{"text": SYSTEM_INSTRUCTION}]},
        "contents": [
            {"role": "user", "parts": [{"text": user_prompt(example["question"], example["context"])}]},
            {"role": "model", "parts": [{"text": training_answer(example)}]},
        ],
    }


def to_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    """Legacy completions format: a separator ends the prompt and the completion starts with a space."""
    prompt = f"{SYSTEM_INSTRUCTION}\n\n{user_prompt(example['question'], example['context'])}"
    return {"prompt": prompt, "completion": " " + training_answer(example)}


FORMATS = {
    "openai": to_openai_chat,
    "gemini": to_gemini,
    "completion": to_prompt_completion,
}

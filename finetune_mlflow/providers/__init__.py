"""Provider registry: one line per provider package. Each package's `__init__` is pure (no SDK import) and names
its provider class (`PROVIDER_CLASS`, imported only when that provider is used) and its tuning-record converter
(`TRAINING_RECORD`); its settings are the config section of the same name."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

from finetune_mlflow.errors import ConfigError

if TYPE_CHECKING:
    from finetune_mlflow.config import Config
    from finetune_mlflow.providers.base import Provider

PROVIDERS: dict[str, str] = {
    "local": "finetune_mlflow.providers.local",
    "openai": "finetune_mlflow.providers.openai",
    "vertex": "finetune_mlflow.providers.vertex",
    "transformers": "finetune_mlflow.providers.transformers",
    "together": "finetune_mlflow.providers.together",
}


def _package(name: str) -> ModuleType:
    try:
        return importlib.import_module(PROVIDERS[name])
    except KeyError:
        raise ConfigError(f"unknown provider {name!r}; expected one of {', '.join(sorted(PROVIDERS))} "
                          "(set tune.provider or -P provider=)") from None


def provider_class(name: str) -> type:
    module_name, class_name = _package(name).PROVIDER_CLASS.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_provider(name: str, config: "Config") -> "Provider":
    """Build the named provider from the resolved config (credentials are resolved in its constructor)."""
    return provider_class(name)(config)


def training_records() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """Provider name -> converter of a canonical example into that provider's tuning record (`prepared/<name>/`)."""
    converters = {name: _package(name).TRAINING_RECORD for name in PROVIDERS}
    return {name: convert for name, convert in converters.items() if convert is not None}

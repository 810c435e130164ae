"""What a registered transformers model needs to load and serve, pinned to the versions that produced it.

Explicit, so MLflow does not infer them by loading the (large) model in a subprocess; peft and trl are not needed
to serve: the version ships the merged model."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SERVING_PACKAGES = ("mlflow", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "pandas", "numpy",
                    "pyyaml")


def serving_requirements() -> list[str]:
    pins = []
    for name in SERVING_PACKAGES:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")  # torch 2.13.0+cpu -> torch==2.13.0
        except PackageNotFoundError:
            pins.append(name)
    return pins

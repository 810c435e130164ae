"""What a registered transformers model needs to load and serve, pinned to the versions that produced it.

Explicit, so MLflow does not infer them by loading the (large) model in a subprocess; peft and trl are not needed
to serve: the version ships the merged model."""

from __future__ import annotations


SERVING_PACKAGES = ("mlflow", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "pandas", "numpy",
                    "pyyaml")


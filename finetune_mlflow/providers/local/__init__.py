"""The embedded default provider: a span ranker trained on this machine in a detached background job.

Trains on the canonical `prepared/{train,validation}.jsonl`, so it adds no provider-format files to `prepared/`.
"""

from __future__ import annotations

PROVIDER_CLASS = "finetune_mlflow.providers.local.provider:LocalProvider"
# Canonical example -> this provider's tuning record, written to `prepared/<provider>/`; None: uses the canonical files.
TRAINING_RECORD = None

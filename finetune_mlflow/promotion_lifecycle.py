"""The lifecycle part of a promotion decision: warn about a champion or candidate that retires soon, and refuse a
candidate that shuts down within `promotion.min_days_to_shutdown` (force=true with a reason still overrides, as
for every gate). Kept beside `promotion.decide` rather than inside it: the tags come from the registry."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from finetune_mlflow.config import Config
from finetune_mlflow.lifecycle_facts import shutdown_gate
from finetune_mlflow.lifecycle_record import today, warn_if_retiring
from finetune_mlflow.promotion import Decision


def lifecycle_gate(decision: Decision, candidate: str, candidate_tags: Mapping[str, str], champion: str | None,
                   champion_tags: Mapping[str, str] | None, config: Config) -> Decision:
    """`decision` with the shutdown gate applied (check `lifecycle`); warnings are log lines only."""
    warn_if_retiring(f"champion v{champion}", champion_tags or {}, config.lifecycle.warn_days) if champion else None
    warn_if_retiring(f"candidate v{candidate}", candidate_tags, config.lifecycle.warn_days)
    refused = shutdown_gate(candidate_tags, today(), config.promotion.min_days_to_shutdown)
    checks = {**decision.checks, "lifecycle": refused is None}
    if refused is None:
        return dataclasses.replace(decision, checks=checks)
    reasons = "; ".join(r for r in (refused, decision.reason if not decision.promote else "") if r)
    return Decision(False, reasons, checks)

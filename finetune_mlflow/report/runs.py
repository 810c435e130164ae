"""Plain records of tune runs, the only input the comparison report reads: no MLflow here, so every table, verdict
and figure can be built (and tested) from literals, and the same code serves runs from any store."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

# Providers that bill nothing: a missing or zero cost estimate means "no cost", not "unknown".
FREE_PROVIDERS = frozenset({"local"})
# The actual total wins over the pre-flight estimate when a run has both.
COST_KEYS = ("cost_total_usd", "estimated_cost_usd")
CURVE_KEYS = ("train_loss", "val_loss")


@dataclass(frozen=True)
class Curve:
    """One metric's history: training steps and values, in step order."""

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class RunRecord:
    """One finished tune run: the knobs that define it, its summary metrics and its loss curves."""

    run_id: str
    run_name: str
    provider: str
    base_model: str
    epochs: float | None = None
    learning_rate: float | None = None
    batch_size: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    curves: Mapping[str, Curve] = field(default_factory=dict)
    # The provider's own settings (`vertex.adapter_size`, ...): shown where they differ between runs.
    knobs: Mapping[str, str] = field(default_factory=dict)

    def metric(self, key: str) -> float | None:
        """The metric's value, or None when the run did not log it (or logged NaN)."""
        value = self.metrics.get(key)
        return None if value is None or math.isnan(float(value)) else float(value)

    @property
    def cost_usd(self) -> float | None:
        """Known cost in USD (None where unknown or free: see `is_free`)."""
        for key in COST_KEYS:
            value = self.metric(key)
            if value is not None and value > 0:
                return value
        return None

    @property
    def is_free(self) -> bool:
        """True for a provider that bills nothing, or a run whose cost was estimated as exactly zero."""
        if self.cost_usd is not None:
            return False
        return self.provider in FREE_PROVIDERS or any(self.metric(key) == 0 for key in COST_KEYS)

    @property
    def cost_per_f1_point(self) -> float | None:
        """USD per point of F1 gained over the base model; None without a known cost or a positive gain."""
        gain = self.metric("eval_f1_delta")
        if self.cost_usd is None or gain is None or gain <= 0:
            return None
        return self.cost_usd / gain


def display_names(records: Sequence[RunRecord]) -> dict[str, str]:
    """run id -> a label unique within the report: the run name, with a short run id where names repeat."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.run_name] = counts.get(record.run_name, 0) + 1
    unique = {name for name, count in counts.items() if name and count == 1}
    return {r.run_id: r.run_name if r.run_name in unique else f"{r.run_name or 'run'} ({r.run_id[:8]})"
            for r in records}


def varying_settings(records: Sequence[RunRecord]) -> list[str]:
    """The settings besides provider/base model/epochs whose values differ between runs, in a stable order:
    these are what a reader needs to tell two rows (or two series) apart."""
    names = ["learning_rate", "batch_size"] + sorted({k for r in records for k in r.knobs})
    return [name for name in names if len({setting(r, name) for r in records}) > 1]


def setting(record: RunRecord, name: str) -> str:
    """A setting as text for tables and labels ("" when the run does not have it)."""
    if name in ("epochs", "learning_rate", "batch_size"):
        value = getattr(record, name)
        return "" if value is None else f"{value:g}"
    return record.knobs.get(name, "")

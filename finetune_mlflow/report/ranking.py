"""The winner rule shared by the report and the sweep: highest `eval_f1`; ties go to the lower `latency_ms_p95`,
then to the lower cost. A run missing a number loses every comparison on that number."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from finetune_mlflow.report.runs import RunRecord

# F1 is a mean of per-question scores x 100: two runs with the same answers can differ only by summation order.
F1_TIE_DIGITS = 6


def winner_key(record: RunRecord) -> tuple[float, float, float, str]:
    """Sort key, best first: -F1, p95 latency, cost (free is 0, unknown is infinite), then run id for stability."""
    f1 = record.metric("eval_f1")
    latency = record.metric("latency_ms_p95")
    cost = 0.0 if record.is_free else record.cost_usd
    return (-round(f1, F1_TIE_DIGITS) if f1 is not None else math.inf,
            latency if latency is not None else math.inf,
            cost if cost is not None else math.inf,
            record.run_id)


def rank_runs(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Best first, by `winner_key`."""
    return sorted(records, key=winner_key)


def pick_winner(records: Sequence[RunRecord]) -> RunRecord | None:
    """The best run that has an `eval_f1`; None when no run has one."""
    ranked = [r for r in rank_runs(records) if r.metric("eval_f1") is not None]
    return ranked[0] if ranked else None


@dataclass(frozen=True)
class Margin:
    """How the winner beat the runner-up: the F1 gap, and which rule decided it."""

    runner_up: RunRecord
    f1_gap: float
    decided_by: str  # "f1", "latency", "cost" or "none" (identical on every rule)
    intervals_overlap: bool


def margin(winner: RunRecord, runner_up: RunRecord) -> Margin:
    """Compare the two best runs of `rank_runs`."""
    gap = (winner.metric("eval_f1") or 0.0) - (runner_up.metric("eval_f1") or 0.0)
    first, second = winner_key(winner), winner_key(runner_up)
    decided_by = next((rule for rule, a, b in zip(("f1", "latency", "cost"), first, second) if a != b), "none")
    low = winner.metric("eval_f1_ci_low")
    high = runner_up.metric("eval_f1_ci_high")
    overlap = low is not None and high is not None and low <= high
    return Margin(runner_up, gap, decided_by, overlap)

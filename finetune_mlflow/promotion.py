"""Pure promotion gates: given the evidence, decide whether a candidate replaces the champion, and say why.

The same gates hold whatever the reference is: the champion, or the base model when there is no champion yet (a
first promotion is not a free pass). Against the base model the point gain must also be positive, so nothing
worse than the base model is promoted whatever `min_f1_gain` allows."""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune_mlflow.config import PromotionConfig


@dataclass(frozen=True)
class Evidence:
    """What the candidate's evaluation shows, relative to the champion when there is one."""

    candidate_f1: float
    candidate_error_rate: float
    candidate_latency_ms_p95: float | None
    # What the candidate is compared with: the champion, else the base model on the same questions; None when
    # neither has results on them.
    reference: str | None = None
    reference_f1: float | None = None
    # Paired-bootstrap 95% interval of mean F1(candidate) - F1(reference) over the same questions.
    f1_delta: float | None = None
    f1_delta_ci_low: float | None = None
    f1_delta_ci_high: float | None = None


# The reference when there is no champion yet.
BASE_REFERENCE = "base model"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    checks: dict[str, bool] = field(default_factory=dict)


def decide(evidence: Evidence, gates: PromotionConfig) -> Decision:
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    checks["error_rate"] = evidence.candidate_error_rate <= gates.max_error_rate
    if not checks["error_rate"]:
        reasons.append(f"error rate {evidence.candidate_error_rate:.1%} is over max_error_rate "
                       f"{gates.max_error_rate:.1%}")
    if gates.max_latency_ms_p95:
        latency = evidence.candidate_latency_ms_p95
        checks["latency"] = latency is not None and latency <= gates.max_latency_ms_p95
        if not checks["latency"]:
            shown = "unknown" if latency is None else f"{latency:.0f}"
            reasons.append(f"latency p95 {shown} ms is over max_latency_ms_p95 {gates.max_latency_ms_p95:g} ms")
    if evidence.reference is None:
        checks["f1_gain"] = False
        reasons.append("no champion and no base-model results on the same questions to compare with")
    else:
        above_base = evidence.reference != BASE_REFERENCE or (evidence.f1_delta is not None and evidence.f1_delta > 0)
        if not above_base:
            reasons.append(f"F1 {evidence.candidate_f1:.2f} is not above the base model's {evidence.reference_f1:.2f} "
                           f"on the same questions (gain {evidence.f1_delta:+.2f}, 95% CI "
                           f"{evidence.f1_delta_ci_low:+.2f} to {evidence.f1_delta_ci_high:+.2f})")
        low = evidence.f1_delta_ci_low
        clears = low is not None and low > gates.min_f1_gain
        if above_base and not clears:
            reasons.append(f"F1 gain over the {evidence.reference} {evidence.f1_delta:+.2f} (95% CI {low:+.2f} to "
                           f"{evidence.f1_delta_ci_high:+.2f}) does not clear min_f1_gain {gates.min_f1_gain:+.2f} "
                           "at the lower bound")
        checks["f1_gain"] = above_base and clears
    if reasons:
        return Decision(False, "; ".join(reasons), checks)
    if evidence.reference == BASE_REFERENCE:
        return Decision(True, f"no champion yet; F1 {evidence.candidate_f1:.2f} beats the base model's "
                              f"{evidence.reference_f1:.2f} on the same questions (gain {evidence.f1_delta:+.2f}, "
                              f"95% CI {evidence.f1_delta_ci_low:+.2f} to {evidence.f1_delta_ci_high:+.2f}) and "
                              f"clears min_f1_gain {gates.min_f1_gain:+.2f}", checks)
    return Decision(True, f"F1 gain over the {evidence.reference} {evidence.f1_delta:+.2f} (95% CI "
                          f"{evidence.f1_delta_ci_low:+.2f} to {evidence.f1_delta_ci_high:+.2f}) clears min_f1_gain "
                          f"{gates.min_f1_gain:+.2f}", checks)

"""Pure: the non-inferiority rule of `migrate`. A candidate passes when the 95% lower bound of its paired F1 delta
against the champion is above `-max_f1_loss` (and, with captured prompts, its agreement with the champion's
recorded answers has a lower bound above `100 - max_agreement_loss`), its p95 latency and error rate pass the
promotion gates, and its own model does not shut down within `min_days_to_shutdown`. Among those that pass, the
cheapest per 1,000 requests wins (ties: higher F1; an unknown cost ranks after every known one). Each miss is
said with its size."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Standing:
    """One model's evidence on the champion's questions (the champion's own row has no delta)."""

    label: str
    version: str | None
    run_id: str | None
    f1: Interval | None
    f1_delta: Interval | None = None
    agreement_f1: Interval | None = None
    latency_ms_p95: float | None = None
    error_rate: float | None = None
    cost_per_1k_usd: float | None = None
    shutdown_date: str = "unknown"
    days_left: int | None = None
    # Why it has no evidence (its tune failed, ...): it cannot pass.
    failed: str | None = None


@dataclass(frozen=True)
class Rules:
    max_f1_loss: float
    max_agreement_loss: float
    agreement_required: bool
    max_latency_ms_p95: float  # 0: off
    max_error_rate: float
    min_days_to_shutdown: int


@dataclass(frozen=True)
class Verdict:
    passed: bool
    misses: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "passes" if self.passed else "fails: " + "; ".join(self.misses)


def verdict(candidate: Standing, rules: Rules) -> Verdict:
    if candidate.failed:
        return Verdict(False, [candidate.failed])
    misses = []
    delta = candidate.f1_delta
    if delta is None:
        misses.append("no paired F1 delta against the champion (no shared questions)")
    elif delta.low <= -rules.max_f1_loss:
        misses.append(f"F1 delta lower bound {delta.low:+.2f} is not above -{rules.max_f1_loss:g} (missed by "
                      f"{-rules.max_f1_loss - delta.low:.2f} points)")
    if rules.agreement_required:
        agreement, floor = candidate.agreement_f1, 100.0 - rules.max_agreement_loss
        if agreement is None:
            misses.append("no agreement with the champion's captured answers")
        elif agreement.low <= floor:
            misses.append(f"agreement F1 lower bound {agreement.low:.2f} is not above {floor:g} (missed by "
                          f"{floor - agreement.low:.2f} points)")
    if rules.max_latency_ms_p95 and (candidate.latency_ms_p95 is None
                                     or candidate.latency_ms_p95 > rules.max_latency_ms_p95):
        misses.append(f"p95 latency {candidate.latency_ms_p95} ms is over {rules.max_latency_ms_p95:g} ms")
    if candidate.error_rate is None or candidate.error_rate > rules.max_error_rate:
        misses.append(f"error rate {candidate.error_rate} is over {rules.max_error_rate:g}")
    if candidate.days_left is not None and candidate.days_left < rules.min_days_to_shutdown:
        misses.append(f"its model shuts down on {candidate.shutdown_date}, {candidate.days_left} day(s) from today "
                      f"(min_days_to_shutdown {rules.min_days_to_shutdown})")
    return Verdict(not misses, misses)


def pick(candidates: list[Standing], verdicts: list[Verdict]) -> Standing | None:
    """The cheapest passing candidate per 1,000 requests; ties by higher F1."""
    passing = [c for c, v in zip(candidates, verdicts) if v.passed]
    if not passing:
        return None
    return min(passing, key=lambda c: (c.cost_per_1k_usd is None, c.cost_per_1k_usd or 0.0,
                                       -(c.f1.estimate if c.f1 else 0.0), c.label))


def decision_text(champion: Standing, retiring_model: str, winner: Standing | None) -> str:
    """The sentence recorded with the move (or with its absence): names the retiring model and its date."""
    where = f"{retiring_model} (champion v{champion.version}) shuts down on {champion.shutdown_date}"
    if winner is None:
        return f"migrate: {where}; no candidate passed the non-inferiority rule, the champion stays"
    delta = winner.f1_delta
    cost = "unknown" if winner.cost_per_1k_usd is None else f"${winner.cost_per_1k_usd:.4f}"
    return (f"migrate: {where}; v{winner.version} ({winner.label}) is not worse (F1 delta {delta.estimate:+.2f}, "
            f"95% CI {delta.low:+.2f} to {delta.high:+.2f}) and is the cheapest that passes ({cost} per 1,000 "
            "requests)")


def cost_per_1k(n: float, input_tokens: float | None, output_tokens: float | None,
                price: tuple[float, float] | None, bills: bool) -> float | None:
    """USD per 1,000 requests at the evaluation's mean token usage; 0 for a provider that bills nothing."""
    if not bills:
        return 0.0
    if price is None or not n or input_tokens is None or output_tokens is None:
        return None
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000 / n * 1000

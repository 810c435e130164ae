"""Choose honestly among a study's trials (pure: no MLflow, no Optuna). The winner is the best trial by F1; every
other completed trial gets the paired-bootstrap 95% interval of its F1 difference to the winner on the same
questions (`stats.paired_bootstrap_delta`). A trial whose interval holds 0 is "not distinguishable" from the winner,
and among the winner and those, the cheaper one is recommended (estimated cost when every one of them has it,
else the training work: tokens billed, or examples seen), then the faster one (p95 latency lower
by more than LATENCY_NOISE_MARGIN), else the winner itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from finetune_mlflow.stats import Interval, paired_bootstrap_delta

# Two evaluations of one model on a loaded 2-core machine differ in p95 latency by up to a quarter (14 vs 19 ms
# seen for two trials that predicted alike): a smaller difference is noise, not a reason to prefer a trial.
LATENCY_NOISE_MARGIN = 0.25


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    run_id: str
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: dict[str, object]
    f1: float | None = None
    cost_usd: float | None = None
    latency_ms_p95: float | None = None
    trained: float | None = None  # training work: billed tokens, else steps x batch size
    f1_by_question: Mapping[str, float] = field(default_factory=dict)
    note: str = ""  # why it was pruned or failed


@dataclass(frozen=True)
class Compared:
    outcome: TrialOutcome
    delta: Interval | None  # F1 of this trial minus the winner's, None for the winner itself
    distinguishable: bool


@dataclass(frozen=True)
class Choice:
    winner: TrialOutcome
    compared: list[Compared]
    recommended: TrialOutcome
    reason: str


def compare(outcomes: list[TrialOutcome], *, samples: int = 1000, seed: int = 0) -> Choice | None:
    """The winner, every completed trial against it, and the recommendation; None when no trial completed."""
    done = [o for o in outcomes if o.state == "COMPLETE" and o.f1 is not None]
    if not done:
        return None
    winner = max(done, key=lambda o: (o.f1, -o.number))
    compared = []
    for other in sorted(done, key=lambda o: (-o.f1, o.number)):
        if other is winner:
            compared.append(Compared(other, None, False))
            continue
        shared = sorted(set(other.f1_by_question) & set(winner.f1_by_question))
        if not shared:
            compared.append(Compared(other, None, True))  # no common questions: nothing says they are alike
            continue
        delta = paired_bootstrap_delta([other.f1_by_question[q] for q in shared],
                                       [winner.f1_by_question[q] for q in shared], samples=samples, seed=seed)
        compared.append(Compared(other, delta, not (delta.low <= 0 <= delta.high)))
    alike = [c.outcome for c in compared if not c.distinguishable]
    recommended, reason = _recommend(winner, alike)
    return Choice(winner, compared, recommended, reason)


def _recommend(winner: TrialOutcome, alike: list[TrialOutcome]) -> tuple[TrialOutcome, str]:
    if len(alike) == 1:
        return winner, f"trial {winner.number} has the best F1 and no other trial is indistinguishable from it"
    if all(o.cost_usd is not None for o in alike) and len({o.cost_usd for o in alike}) > 1:
        cheapest = min(alike, key=lambda o: (o.cost_usd, o.number))
        if cheapest.cost_usd < winner.cost_usd:
            return cheapest, (f"trial {cheapest.number} is not distinguishable from the best F1 (trial "
                              f"{winner.number}) and costs ${cheapest.cost_usd:.2f} instead of ${winner.cost_usd:.2f}")
    elif all(o.trained is not None for o in alike):
        cheapest = min(alike, key=lambda o: (o.trained, o.number))
        if cheapest.trained < winner.trained:
            return cheapest, (f"trial {cheapest.number} is not distinguishable from the best F1 (trial "
                              f"{winner.number}) and trained on {cheapest.trained:.0f} instead of "
                              f"{winner.trained:.0f} (tokens or examples: the cost where no price is known)")
    if winner.latency_ms_p95 is not None:
        faster = [o for o in alike if o.latency_ms_p95 is not None
                  and o.latency_ms_p95 < winner.latency_ms_p95 * (1 - LATENCY_NOISE_MARGIN)]
        if faster:
            best = min(faster, key=lambda o: (o.latency_ms_p95, o.number))
            return best, (f"trial {best.number} is not distinguishable from the best F1 (trial {winner.number}) "
                          f"and answers faster: p95 {best.latency_ms_p95:.1f} ms vs {winner.latency_ms_p95:.1f} ms "
                          f"(more than the {LATENCY_NOISE_MARGIN:.0%} noise margin)")
    return winner, (f"trial {winner.number} has the best F1; {len(alike) - 1} other trial(s) are not distinguishable "
                    "from it but none is cheaper or faster beyond the noise margin")

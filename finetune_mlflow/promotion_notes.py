"""What a promote decision writes on the model version itself, so its registry page says why it holds (or not)
its alias: tags to filter on and a description section a person reads. Pure: no MLflow here.

A version's description keeps what `tune` wrote; the section below MARKER is replaced by each new decision (the
promote runs keep the history)."""

from __future__ import annotations

from finetune_mlflow.config import PromotionConfig
from finetune_mlflow.promotion import Decision, Evidence

MARKER = "\n\n---\n**Promotion**"


def gates_text(gates: PromotionConfig) -> str:
    latency = f"{gates.max_latency_ms_p95:g} ms" if gates.max_latency_ms_p95 else "off"
    return (f"F1 gain lower bound > {gates.min_f1_gain:+g}, error rate <= {gates.max_error_rate:.0%}, "
            f"p95 latency <= {latency}")


def gain_text(evidence: Evidence) -> str:
    if evidence.reference is None or evidence.f1_delta is None:
        return "no reference on the same questions"
    return (f"{evidence.f1_delta:+.2f} F1 over the {evidence.reference} (95% CI {evidence.f1_delta_ci_low:+.2f} to "
            f"{evidence.f1_delta_ci_high:+.2f})")


def outcome(decision: Decision, forced: bool) -> str:
    return "forced" if forced and decision.promote else "promoted" if decision.promote else "rejected"


def version_tags(decision: Decision, evidence: Evidence, gates: PromotionConfig, *, forced: bool, alias: str,
                 run_id: str, when: str) -> dict[str, str]:
    tags = {"promotion.decision": outcome(decision, forced), "promotion.alias": alias,
            "promotion.reason": decision.reason[:5000], "promotion.gates": gates_text(gates),
            "promotion.run_id": run_id, "promotion.decided_at": when,
            "promotion.reference": evidence.reference or "none"}
    if evidence.f1_delta is not None:
        tags.update({"promotion.f1_gain": f"{evidence.f1_delta:+.2f}",
                     "promotion.f1_gain_ci95": f"{evidence.f1_delta_ci_low:+.2f} to {evidence.f1_delta_ci_high:+.2f}"})
    return tags


def version_description(previous: str | None, decision: Decision, evidence: Evidence, gates: PromotionConfig, *,
                        forced: bool, alias: str, run_link: str, when: str) -> str:
    """The version's description with its promotion section (re)written."""
    head = (previous or "").split(MARKER, 1)[0]
    verdict = {"forced": f"made {alias} by force", "promoted": f"promoted to {alias}",
               "rejected": f"not promoted to {alias}"}[outcome(decision, forced)]
    return (f"{head}{MARKER} ({when}): **{verdict}**. {decision.reason}.\n\n"
            f"- gain: {gain_text(evidence)}\n- gates: {gates_text(gates)}\n- decided by {run_link}\n")

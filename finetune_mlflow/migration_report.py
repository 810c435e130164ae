"""Pure: the migration report (markdown) and its table: the champion beside every candidate with F1 and
agreement (95% intervals), the paired delta to the champion, p95 latency, cost per 1,000 requests, lifecycle and
the verdict, with how far each failing candidate missed."""

from __future__ import annotations

from typing import Any

from finetune_mlflow.migration_rule import Interval, Rules, Standing, Verdict


def _interval(value: Interval | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(value.estimate)} [{fmt.format(value.low)}, {fmt.format(value.high)}]"


def _cost(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def _lifecycle(standing: Standing) -> str:
    if standing.days_left is None:
        return standing.shutdown_date if standing.shutdown_date != "unknown" else "no shutdown announced"
    return f"{standing.shutdown_date} ({standing.days_left} days)"


def _cells(standing: Standing, verdict_text: str) -> list[str]:
    latency = "-" if standing.latency_ms_p95 is None else f"{standing.latency_ms_p95:.1f}"
    return [f"v{standing.version}" if standing.version else "-", standing.label, _interval(standing.f1),
            _interval(standing.agreement_f1), _interval(standing.f1_delta, signed=True), latency,
            _cost(standing.cost_per_1k_usd), _lifecycle(standing), verdict_text]


HEADER = ["version", "model", "F1 [95% CI]", "agreement F1 [95% CI]", "F1 delta vs champion [95% CI]",
          "p95 latency ms", "cost / 1,000 requests", "shuts down", "verdict"]


def render_report(name: str, champion: Standing, candidates: list[Standing], verdicts: list[Verdict],
                  winner: Standing | None, decision: str, rules: Rules) -> str:
    rows = [_cells(champion, "champion (recorded answers)")]
    rows += [_cells(c, v.text()) for c, v in zip(candidates, verdicts)]
    escape = lambda cell: cell.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"# Migration of {name}", "", f"**{decision}**", "",
             f"Rule: a candidate passes when the 95% lower bound of its paired F1 delta against the champion is above "
             f"-{rules.max_f1_loss:g}"
             + (f", its agreement with the champion's captured answers has a lower bound above "
                f"{100 - rules.max_agreement_loss:g}" if rules.agreement_required else "")
             + f", its error rate is at most {rules.max_error_rate:g}"
             + (f", its p95 latency at most {rules.max_latency_ms_p95:g} ms" if rules.max_latency_ms_p95 else "")
             + f" and its model does not shut down within {rules.min_days_to_shutdown} days; the cheapest per 1,000 "
             "requests among those that pass wins (ties: higher F1).", "",
             "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    lines += ["", f"Winner: v{winner.version} ({winner.label})" if winner else "Winner: none; the champion stays."]
    return "\n".join(lines) + "\n"


def table_columns(champion: Standing, candidates: list[Standing], verdicts: list[Verdict]) -> dict[str, list[Any]]:
    rows = [_cells(champion, "champion")] + [_cells(c, v.text()) for c, v in zip(candidates, verdicts)]
    return {header: [row[i] for row in rows] for i, header in enumerate(HEADER)}

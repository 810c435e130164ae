"""The report's tables as plain rows of text, rendered once to markdown and once to HTML from the same rows."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Sequence

from finetune_mlflow.report.runs import RunRecord, setting, varying_settings

MISSING = "—"


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


def number(value: float | None, *, signed: bool = False, digits: int = 2) -> str:
    if value is None:
        return MISSING
    if not abs(value) < 1e12:  # 1e308 (or inf) in fixed point is a 300-digit cell
        return f"{value:+.3g}" if signed else f"{value:.3g}"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def with_interval(record: RunRecord, key: str, *, signed: bool = False) -> str:
    """`36.45 [34.16, 38.87]`: the metric and its 95% interval (`<key>_ci_low/_ci_high`) where logged."""
    value = number(record.metric(key), signed=signed)
    low, high = record.metric(f"{key}_ci_low"), record.metric(f"{key}_ci_high")
    if value == MISSING or low is None or high is None:
        return value
    return f"{value} [{number(low, signed=signed)}, {number(high, signed=signed)}]"


def cost_text(record: RunRecord) -> str:
    if record.cost_usd is not None:
        return f"${record.cost_usd:,.2f}"
    return "no cost" if record.is_free else "unknown"


def cost_per_point_text(record: RunRecord) -> str:
    if record.cost_per_f1_point is not None:
        return f"${record.cost_per_f1_point:,.2f}"
    if record.is_free:
        return "no cost"
    if record.cost_usd is not None:
        return "no gain"
    return MISSING


def grid_table(ranked: Sequence[RunRecord], names: dict[str, str]) -> Table:
    """One row per run, best first: what defines it, its scores with intervals, latency and cost."""
    extra = [name for name in varying_settings(ranked) if name not in ("learning_rate", "batch_size")]
    headers = (["rank", "run", "provider", "base model", "epochs", "learning rate", "batch size"] + extra +
               ["F1 [95% CI]", "EM [95% CI]", "F1 gain over base [95% CI]", "p95 latency (ms)", "est. cost",
                "cost per F1 point"])
    rows = []
    for rank, record in enumerate(ranked, start=1):
        defined = [setting(record, name) or MISSING for name in ("epochs", "learning_rate", "batch_size", *extra)]
        rows.append([str(rank), names[record.run_id], record.provider, record.base_model, *defined,
                     with_interval(record, "eval_f1"), with_interval(record, "eval_exact_match"),
                     with_interval(record, "eval_f1_delta", signed=True), number(record.metric("latency_ms_p95")),
                     cost_text(record), cost_per_point_text(record)])
    return Table(headers, rows)


def base_vs_tuned_table(ranked: Sequence[RunRecord], names: dict[str, str]) -> Table:
    """Each run against its own base model on the same validation split (paired-bootstrap gain intervals)."""
    headers = ["run", "base model", "base EM [95% CI]", "tuned EM [95% CI]", "EM gain [95% CI]",
               "base F1 [95% CI]", "tuned F1 [95% CI]", "F1 gain [95% CI]"]
    rows = [[names[r.run_id], r.base_model, with_interval(r, "base_eval_exact_match"),
             with_interval(r, "eval_exact_match"), with_interval(r, "eval_exact_match_delta", signed=True),
             with_interval(r, "base_eval_f1"), with_interval(r, "eval_f1"),
             with_interval(r, "eval_f1_delta", signed=True)] for r in ranked]
    return Table(headers, rows)


MARKDOWN_SPECIALS = "\\`|"


def markdown_text(text: str) -> str:
    """Text from a run (its name, a setting) as inert Markdown: one line (a newline would end a table row), the
    characters that end a cell or start code escaped, no link (`](` broken), HTML markup as text (`<script>`
    shows, never runs, where a viewer renders HTML inside Markdown)."""
    one_line = " ".join(str(text).splitlines())
    escaped = "".join("\\" + ch if ch in MARKDOWN_SPECIALS else ch for ch in one_line).replace("](", "]\\(")
    return html.escape(escaped, quote=False)


def to_markdown(table: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(markdown_text(cell) for cell in cells) + " |"

    return "\n".join([line(table.headers), line(["---"] * len(table.headers)), *map(line, table.rows)])


def to_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

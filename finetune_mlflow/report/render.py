"""The comparison report as text: a verdict a person reads first (which setting won, by how much, and whether the
margin is beyond noise), the tables, and for HTML the figures embedded as base64 PNG in one self-contained page."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.report import figures
from finetune_mlflow.report.ranking import margin, rank_runs
from finetune_mlflow.report.runs import RunRecord, display_names
from finetune_mlflow.report.tables import (Table, base_vs_tuned_table, grid_table, markdown_text, number, to_html,
                                          to_markdown, with_interval)

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}tbody tr:first-child{background:#eef7ee}.verdict{font-size:16px;padding:.8em 1em;
background:#f6f8fa;border-left:4px solid #2a7;margin:1em 0}figure{margin:1.5em 0}figcaption{color:#555;font-size:13px}
img{max-width:100%}"""


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str


def _skipped_text(skipped: Mapping[str, int]) -> str:
    total = sum(skipped.values())
    if not total:
        return ""
    reasons = "; ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
    return f"Skipped {total} run(s): {reasons}."


def _gain_sentence(record: RunRecord) -> str:
    gain = record.metric("eval_f1_delta")
    if gain is None:
        return "No base evaluation to compare with."
    low, high = record.metric("eval_f1_delta_ci_low"), record.metric("eval_f1_delta_ci_high")
    sentence = f"{number(gain, signed=True)} F1 over its base model {record.base_model}"
    if low is None or high is None:
        return sentence + "."
    sentence += f" (95% CI {number(low, signed=True)} to {number(high, signed=True)})"
    return sentence + (": not distinguishable from the base model." if low <= 0 <= high else ".")


def _margin_sentence(ranked: Sequence[RunRecord], names: dict[str, str]) -> str:
    if len(ranked) < 2:
        return "Only one run: nothing to compare it with."
    winner, m = ranked[0], margin(ranked[0], ranked[1])
    other = f"the runner-up {names[m.runner_up.run_id]} (F1 {number(m.runner_up.metric('eval_f1'))})"
    if m.decided_by == "f1":
        sentence = f"It beats {other} by {m.f1_gap:.2f} F1 points"
        return sentence + ("; their 95% intervals overlap, so the margin may be noise." if m.intervals_overlap
                           else "; their 95% intervals do not overlap.")
    if m.decided_by == "latency":
        return (f"It ties {other} on F1 and wins on p95 latency ({number(winner.metric('latency_ms_p95'))} ms "
                f"against {number(m.runner_up.metric('latency_ms_p95'))} ms).")
    if m.decided_by == "cost":
        return f"It ties {other} on F1 and latency and wins on cost."
    return f"It ties {other} on F1, latency and cost; the run id breaks the tie."


def verdict(ranked: Sequence[RunRecord], names: dict[str, str]) -> str:
    """One paragraph: the winner, its scores, its gain over base and its margin over the runner-up."""
    winner = ranked[0]
    return (f"Winner: {names[winner.run_id]} (run {winner.run_id}, {winner.provider}/{winner.base_model}) with F1 "
            f"{with_interval(winner, 'eval_f1')} and EM {with_interval(winner, 'eval_exact_match')}; "
            f"{_gain_sentence(winner)} {_margin_sentence(ranked, names)}")


def _cost_note(ranked: Sequence[RunRecord], names: dict[str, str]) -> str:
    """Which runs the cost figure leaves out, and why: free providers say "no cost" instead of plotting zeros."""
    groups = {"no cost (free provider)": [r for r in ranked if r.is_free],
              "cost unknown": [r for r in ranked if not r.is_free and r.cost_usd is None],
              "no F1 gain over base": [r for r in ranked if r.cost_usd is not None and r.cost_per_f1_point is None]}
    return " ".join(f"Not drawn, {why}: {', '.join(names[r.run_id] for r in runs)}." for why, runs in groups.items()
                    if runs)


@dataclass(frozen=True)
class Section:
    """A figure's place in the report: the chart, the text shown instead when there is none, and a note on what
    the chart leaves out."""

    heading: str
    chart: figures.Chart | None
    absent: str
    note: str = ""

    def caption(self) -> str:
        if self.chart is None:
            return self.absent
        return " ".join(part for part in (self.chart.caption, self.note) if part)


def _drawn(heading: str, draw: Callable[[], figures.Chart | None], absent: str, note: str = "") -> Section:
    """A section whose chart could not be drawn (a metric such as 1e308 puts an axis limit at infinity) says so
    instead of failing the whole report."""
    try:
        return Section(heading, draw(), absent, note)
    except (ValueError, OverflowError) as e:
        return Section(heading, None, f"Not drawn: the values cannot be plotted ({e}). {note}".strip(), note)


def _sections(ranked: Sequence[RunRecord], names: dict[str, str]) -> list[Section]:
    cost_note = _cost_note(ranked, names)
    return [_drawn("F1 by epochs", lambda: figures.f1_by_epochs(ranked), "No run has both an epochs setting and an F1."),
            _drawn("Loss curves", lambda: figures.loss_curves(ranked, names), "No run logged a loss history."),
            _drawn("F1 against latency", lambda: figures.f1_by_latency(ranked, names),
                   "No run logged latency_ms_p95."),
            _drawn("Cost per F1 point", lambda: figures.cost_per_point(ranked, names),
                   f"No run has a known cost and an F1 gain over base. {cost_note}".strip(), cost_note)]


def build_report(records: Sequence[RunRecord], *, skipped: Mapping[str, int] | None = None,
                 source: str = "") -> Report:
    """Markdown and self-contained HTML for the given runs (at least one)."""
    if not records:
        raise FinetuneError(" ".join(part for part in (
            f"no finished tune run with eval_f1 to report on{f' from {source}' if source else ''}.",
            _skipped_text(skipped or {})) if part))
    ranked = rank_runs(records)
    names = display_names(ranked)
    title = f"Fine-tuning comparison: {len(ranked)} run(s)" + (f" from {source}" if source else "")
    tables = [("Runs, best first", grid_table(ranked, names)),
              ("Base vs tuned (95% intervals; gains are paired over the same questions)",
               base_vs_tuned_table(ranked, names))]
    notes = [verdict(ranked, names), _skipped_text(skipped or {})]
    sections = _sections(ranked, names)
    return Report(_markdown(title, notes, tables, sections), _html(title, notes, tables, sections))


def _markdown(title: str, notes: list[str], tables: list[tuple[str, Table]], sections: list[Section]) -> str:
    parts = [f"# {markdown_text(title)}", *[markdown_text(note) for note in notes if note]]
    for heading, table in tables:
        parts += [f"## {heading}", to_markdown(table)]
    parts += ["## Figures", "\n".join(f"- {s.heading}: " + ("in report.html. " if s.chart else "")
                                       + markdown_text(s.caption()) for s in sections)]
    return "\n\n".join(parts) + "\n"


def _html(title: str, notes: list[str], tables: list[tuple[str, Table]], sections: list[Section]) -> str:
    verdict_text, *rest = notes
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="verdict">{html.escape(verdict_text)}</p>']
    body += [f"<p>{html.escape(note)}</p>" for note in rest if note]
    for heading, table in tables:
        body += [f"<h2>{html.escape(heading)}</h2>", to_html(table)]
    for section in sections:
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.chart is None:
            body.append(f"<p>{html.escape(section.caption())}</p>")
            continue
        data = base64.b64encode(section.chart.png).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(section.chart.title)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(section.caption())}</figcaption></figure>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")

"""Where a finished report goes: files on disk (the `report` command) or artifacts of a parent run (sweep, main)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from mlflow.tracking import MlflowClient

from finetune_mlflow.report.collect import from_parent
from finetune_mlflow.report.render import Report, build_report
from finetune_mlflow.report.runs import RunRecord

ARTIFACT_DIR = "report"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """report.md and report.html in `out_dir` (created if needed); returns both paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    markdown, page = folder / MARKDOWN_FILE, folder / HTML_FILE
    markdown.write_text(report.markdown, encoding="utf-8")
    page.write_text(report.html, encoding="utf-8")
    return markdown, page


def log_report(run_id: str, records: Sequence[RunRecord], *, skipped: Mapping[str, int] | None = None,
               source: str = "") -> Report:
    """Build the report for `records` and attach it to `run_id` as `report/report.md` and `report/report.html`
    (the MLflow UI previews both in the run's Artifacts tab)."""
    report = build_report(records, skipped=skipped, source=source)
    client = MlflowClient()
    client.log_text(run_id, report.markdown, f"{ARTIFACT_DIR}/{MARKDOWN_FILE}")
    client.log_text(run_id, report.html, f"{ARTIFACT_DIR}/{HTML_FILE}")
    return report


def log_children_report(parent_run_id: str) -> Report:
    """What `sweep` and `main` call last: the report over the parent's tune children, attached to the parent."""
    collected = from_parent(parent_run_id)
    return log_report(parent_run_id, collected.records, skipped=collected.skipped,
                      source=f"the children of run {parent_run_id}")

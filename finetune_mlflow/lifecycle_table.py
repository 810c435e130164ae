"""Pure: the rows `lifecycle` prints (one per registered version), soonest shutdown first, and their text table."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Mapping

from finetune_mlflow.lifecycle_facts import CHECKED_TAG, SHUTDOWN_TAG, SOURCE_TAG, STAGE_TAG, UNKNOWN, days_left, \
    shutdown_from_tags


@dataclass(frozen=True)
class VersionRow:
    model_name: str
    version: str
    aliases: tuple[str, ...]
    provider: str
    provider_model: str
    shutdown_date: str
    days_left: int | None
    stage: str
    source: str
    checked_at: str

    def as_dict(self) -> dict[str, object]:
        return {"registered_model": self.model_name, "version": self.version, "aliases": ",".join(self.aliases),
                "provider": self.provider, "provider_model": self.provider_model,
                "shutdown_date": self.shutdown_date, "days_left": self.days_left, "stage": self.stage,
                "source": self.source, "checked_at": self.checked_at}


def version_row(model_name: str, version: str, aliases: tuple[str, ...], tags: Mapping[str, str],
                today: dt.date) -> VersionRow:
    return VersionRow(model_name, version, aliases, tags.get("provider", UNKNOWN), tags.get("tuned_model", UNKNOWN),
                      tags.get(SHUTDOWN_TAG, UNKNOWN), days_left(shutdown_from_tags(tags), today),
                      tags.get(STAGE_TAG, UNKNOWN), tags.get(SOURCE_TAG, ""), tags.get(CHECKED_TAG, "never"))


def soonest_first(rows: list[VersionRow]) -> list[VersionRow]:
    """Dated rows by days left (fewest first), then the undated; ties by name and version."""
    return sorted(rows, key=lambda r: (r.days_left is None, r.days_left or 0, r.model_name, int(r.version)))


def render(rows: list[VersionRow]) -> str:
    """A fixed-width table: what a person reads first is which version stops answering when, and who serves it."""
    header = ("model", "version", "aliases", "days left", "shutdown", "stage", "served by")
    lines = [(r.model_name, r.version, ",".join(r.aliases) or "-",
              "unknown" if r.days_left is None else str(r.days_left), r.shutdown_date, r.stage,
              f"{r.provider} {r.provider_model}") for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *lines]) + "\n"

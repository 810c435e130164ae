"""Pure: Together's metric rows as MetricPoints under the shared keys, read once each with a cursor.

`GET /fine-tunes/{id}/metrics` returns flat rows of floats in chronological order, e.g.
`{"train/loss": 0.5, "train/learning_rate": 1e-4, "train/global_step": 7}` (docs.together.ai, "Get metrics"),
filtered with `global_step_from` (inclusive). A step's evaluation row can land after its training row was read,
so the cursor is `"<last step>:<keys already read at that step>"`: the next read starts at that step again and
drops what was read, so no (key, step) is logged twice and a late `val_loss` is not lost.
Rows carry no time: points are stamped with the time they were read.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from finetune_mlflow.providers.base import MetricPoint

# Row key -> the shared key every provider logs.
METRIC_KEYS = {"train/loss": "train_loss", "eval/loss": "val_loss", "train/learning_rate": "train_learning_rate"}
STEP_KEYS = ("train/global_step", "eval/global_step", "global_step", "step")


def parse_cursor(cursor: str | None) -> tuple[int | None, frozenset[str]]:
    if not cursor:
        return None, frozenset()
    step, _, keys = cursor.partition(":")
    try:
        return int(step), frozenset(k for k in keys.split(",") if k)
    except ValueError:
        return None, frozenset()


def make_cursor(step: int, keys: Iterable[str]) -> str:
    return f"{step}:{','.join(sorted(keys))}"


def row_points(row: Mapping[str, Any], timestamp_ms: int) -> list[MetricPoint]:
    """One metrics row -> its points; a row without a step or with non-finite values yields only what is sound."""
    step = next((row[k] for k in STEP_KEYS if isinstance(row.get(k), (int, float))), None)
    if step is None or not math.isfinite(step):
        return []
    points = []
    for source, key in METRIC_KEYS.items():
        value = row.get(source)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            points.append(MetricPoint(key, float(value), int(step), timestamp_ms))
    return points


def new_points(rows: Iterable[Mapping[str, Any]], cursor: str | None,
               timestamp_ms: int) -> tuple[list[MetricPoint], str | None]:
    """Points not read before `cursor`, in step order (one per key and step), and the next cursor."""
    last_step, seen = parse_cursor(cursor)
    fresh: dict[tuple[int, str], MetricPoint] = {}
    for row in rows:
        for point in row_points(row, timestamp_ms):
            if last_step is not None and (point.step < last_step or (point.step == last_step and point.key in seen)):
                continue
            fresh.setdefault((point.step, point.key), point)
    points = sorted(fresh.values(), key=lambda p: (p.step, p.key))
    if not points:
        return [], cursor
    top = points[-1].step
    keys = {p.key for p in points if p.step == top} | (set(seen) if top == last_step else set())
    return points, make_cursor(top, keys)

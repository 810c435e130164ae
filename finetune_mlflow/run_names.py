"""Run names a person reads in the runs table, whose name column is narrow: what tells runs apart comes first.

A plain tune run reads `tune local/span-ranker-base e3 lr0.005`; a sweep child puts the grid's keys first, e.g.
`e3 lr0.01 · local/span-ranker-base`, so six children of one sweep differ in their first characters. Pure: the
caller reads the sweep point (the child run's `finetune.sweep_point` tag) and passes it in.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_mlflow.config import Config

SWEEP_POINT_TAG = "finetune.sweep_point"  # JSON of the point's dotted keys and values, set by sweep
SEPARATOR = " · "
# Dotted keys with a token of their own in the name (the others show as `leaf=value`).
MODEL_KEYS = ("tune.provider", "tune.base_model")


def _model(config: Config) -> str:
    """The base model's last component: a path, package file or hub id is long (the whole is the param)."""
    tune = config.tune
    short = tune.base_model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
    return f"{tune.provider}/{short or tune.base_model}"


def tokens(config: Config) -> dict[str, str]:
    """The name's parts by the dotted key they show, in reading order."""
    found = {"tune.base_model": _model(config), "tune.epochs": f"e{config.tune.epochs}",
             "tune.learning_rate": f"lr{config.tune.learning_rate:g}"}
    if config.data.max_examples:
        found["data.max_examples"] = f"n{config.data.max_examples}"
    return found


def _value(config: Config, dotted: str) -> Any:
    section, _, leaf = dotted.partition(".")
    return getattr(getattr(config, section), leaf) if leaf else getattr(config, section)


def run_name(config: Config, step: str, varied: tuple[str, ...] = ()) -> str:
    """`tune local/span-ranker-base e3 lr0.005` (` n300` when the data is cut); with `varied` dotted keys (a sweep
    child's grid keys), those first: `e3 lr0.01 · local/span-ranker-base`."""
    parts = tokens(config)
    if not varied:
        return " ".join([step, *parts.values()])
    first = []
    for key in dict.fromkeys("tune.base_model" if key in MODEL_KEYS else key for key in varied):
        if key in parts:
            first.append(parts.pop(key))
        else:
            value = _value(config, key)
            first.append(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float) else
                         f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(first) + (SEPARATOR + " ".join(parts.values()) if parts else "")


def varied_keys(sweep_point: str | None) -> tuple[str, ...]:
    """The dotted keys of a sweep point tag, in grid order; none for a run outside a sweep (or an unreadable tag)."""
    try:
        point = json.loads(sweep_point) if sweep_point else {}
    except ValueError:
        return ()
    return tuple(point) if isinstance(point, dict) else ()

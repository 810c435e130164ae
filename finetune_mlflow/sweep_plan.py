"""The pure half of `sweep`: read a `sweep:` block into grid points, refusing what cannot be run, and pick the
winner of finished points. No MLflow and no network here.

    sweep:
      grid:                      # each key a list; one tune run per combination
        epochs: [1, 2, 3]
        learning_rate: [0.003, 0.01]
        vertex.adapter_size: [4, 8]   # a provider's own knob, as section.key
      max_parallel_jobs: 2       # default: the provider's (local: the machine's cores, openai: 3, vertex: 4)
      max_grid_points: 50        # at most MAX_GRID_POINTS; the grid's size is counted before any point is built
      max_cost_usd: 20           # the whole grid's estimate must be under it, or nothing launches (0: no limit)

Each grid value is coerced and bounds-checked by its knob's own rules, exactly as the child `tune` receives it
(`--set key=value`): `~`, mappings and lists are refused, and `[0.01, 1e-2]` is one value listed twice.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from finetune_mlflow.config import entry_flags, knob_value
from finetune_mlflow.errors import ConfigError

SETTINGS = {"grid", "max_parallel_jobs", "max_grid_points", "max_cost_usd"}
DEFAULT_MAX_GRID_POINTS = 50
# The cap on the cap: every point is validated and priced before anything launches, and the grid table and report
# hold one row per point; a grid beyond this is a search, not a sweep.
MAX_GRID_POINTS = 1000


@dataclass(frozen=True)
class SweepPlan:
    points: list[dict[str, Any]]  # each: dotted config key -> value
    max_parallel_jobs: int  # 0: the provider's default
    max_cost_usd: float


def point_key(point: Mapping[str, Any]) -> str:
    """A stable name for a grid point (the child run's `finetune.sweep_point` tag)."""
    return json.dumps(dict(sorted(point.items())), sort_keys=True)


def _dotted(name: str, source: str) -> str:
    flags = entry_flags()
    if name in flags:
        return flags[name][0]
    if "." in name:
        return name
    raise ConfigError(f"{source}: sweep.grid: unknown key {name!r}; expected one of {', '.join(sorted(flags))} or "
                      "a section.key such as vertex.adapter_size")


def _number(block: Mapping[str, Any], key: str, default: float, source: str) -> float:
    value = block.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{source}: sweep.{key} is {value!r}; expected a number >= 0")
    return value


def child_value(value: Any) -> str:
    """How a grid value reaches the child `tune` (`--set key=<this>`); the parent validates this same string."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _axis(name: str, dotted: str, values: Any, source: str) -> list[Any]:
    """One grid axis as its knob's typed values, each checked as the child will receive it; duplicates refused."""
    where = f"{source}: sweep.grid.{name}"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where} must be a non-empty list, got {values!r}")
    typed: list[Any] = []
    for value in values:
        if value is None or value == "" or isinstance(value, (Mapping, list)):
            raise ConfigError(f"{where}: {value!r} is not a value for {dotted}; give a number, string or true/false "
                              "(empty or null would silently run the config's own value)")
        coerced = knob_value(dotted, value, where)
        if knob_value(dotted, child_value(coerced), where) != coerced:  # what `--set` would make of it
            raise ConfigError(f"{where}: {value!r} does not survive the command line as {dotted}")
        if coerced in typed:
            raise ConfigError(f"{where} lists a value twice: {value!r} is {coerced!r} as {dotted} ({values!r})")
        typed.append(coerced)
    return typed


def plan_sweep(block: Any, source: str) -> SweepPlan:
    """The grid points of a `sweep:` block, or a ConfigError naming the file and key."""
    if not isinstance(block, Mapping) or not isinstance(block.get("grid"), Mapping) or not block["grid"]:
        raise ConfigError(f"{source}: needs a sweep: block with a non-empty grid: mapping (e.g. grid: {{epochs: "
                          "[1, 2, 3]}}) for the sweep entry point")
    unknown = sorted(set(block) - SETTINGS)
    if unknown:
        raise ConfigError(f"{source}: sweep: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(SETTINGS))}")
    limit = int(_number(block, "max_grid_points", DEFAULT_MAX_GRID_POINTS, source))
    if limit > MAX_GRID_POINTS:
        raise ConfigError(f"{source}: sweep.max_grid_points is {limit}; expected at most {MAX_GRID_POINTS}")
    names: dict[str, Any] = {}
    for name, values in block["grid"].items():
        dotted = _dotted(str(name), source)
        if dotted in names:
            raise ConfigError(f"{source}: sweep.grid lists {names[dotted]!r} and {name!r}, both {dotted}; keep one")
        names[dotted] = name
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: sweep.grid.{name} must be a non-empty list, got {values!r}")
    # Counted before anything is built: a 3^40 grid is refused here, not after filling memory.
    size = math.prod(len(v) for v in block["grid"].values())
    if size > limit:
        raise ConfigError(f"{source}: sweep.grid has {size} points, over sweep.max_grid_points={limit}; shrink the "
                          "grid or raise the limit")
    axes = {dotted: _axis(str(name), dotted, block["grid"][name], source) for dotted, name in names.items()}
    points = [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]
    return SweepPlan(points, int(_number(block, "max_parallel_jobs", 0, source)),
                     float(_number(block, "max_cost_usd", 0, source)))

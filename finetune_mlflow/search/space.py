"""The pure half of search: read a `sweep:` block that names `search: random | tpe` into a SearchPlan, refusing
what cannot run with the file and line of the offending key. No MLflow, no Optuna, no network here.

    sweep:
      search: tpe                 # grid (the `grid:` block, as before) | random | tpe
      n_trials: 12                # trials in the whole study, all workers together
      space:
        learning_rate: {low: 0.001, high: 0.03, log: true}   # a float knob: a (log-)uniform range
        epochs: {low: 1, high: 3}                           # an int knob: integers low..high (step: 1)
        local.max_span_tokens: {choices: [6, 8]}            # any knob or section.key
      pruner: median              # none | median | hyperband
      pruner_warmup_steps: 50     # median: no pruning before this training step
      pruner_startup_trials: 3    # median: no pruning until this many trials completed
      storage: ""                 # "": a journal file beside the embedded MLflow store; postgresql://... for a team
      study_name: ""              # "": named after the parent run
      max_parallel_jobs: 2        # trials at once in this worker (default: the provider's)
      max_cost_usd: 20            # n_trials x the costliest corner of the space must be under it (0: no limit)
      seed: 0                     # the sampler's seed
      sampler_startup_trials: 10  # tpe: random trials before the model takes over (Optuna's default)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from finetune_mlflow.config import Config, entry_flags
from finetune_mlflow.errors import ConfigError

Method = Literal["random", "tpe"]
PrunerName = Literal["none", "median", "hyperband"]
SETTINGS = {"search", "n_trials", "space", "pruner", "pruner_warmup_steps", "pruner_startup_trials",
            "hyperband_min_steps", "hyperband_reduction_factor", "storage", "study_name", "max_parallel_jobs",
            "max_cost_usd", "seed", "max_trials", "sampler_startup_trials"}
MAX_TRIALS = 1000  # the default ceiling of n_trials; `max_trials` raises it
MAX_CORNERS = 256  # the worst-case cost is priced at every corner of the space; more is a config error


@dataclass(frozen=True)
class Dimension:
    """One axis of the space: a numeric range (`low`..`high`, `log`, `step`) or a list of `choices`."""

    key: str  # dotted config key, e.g. tune.learning_rate
    kind: Literal["float", "int", "categorical"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def corners(self) -> tuple:
        """The values the worst case of a trial's cost is looked for at: both ends, or every choice."""
        return self.choices if self.kind == "categorical" else (self.low, self.high)


@dataclass(frozen=True)
class SearchPlan:
    method: Method
    n_trials: int
    space: tuple[Dimension, ...]
    pruner: PrunerName
    pruner_warmup_steps: int
    pruner_startup_trials: int
    hyperband_min_steps: int
    hyperband_reduction_factor: int
    storage: str
    study_name: str
    max_parallel_jobs: int  # 0: the provider's default
    max_cost_usd: float
    seed: int
    sampler_startup_trials: int = 10

    def corners(self) -> list[dict[str, Any]]:
        """Every combination of the axes' ends: a trial's cost is highest at one of them."""
        return [dict(zip((d.key for d in self.space), values))
                for values in itertools.product(*(d.corners() for d in self.space))]


def is_search(block: Any) -> bool:
    """Whether a `sweep:` block asks for an Optuna search (anything but the grid)."""
    return isinstance(block, Mapping) and block.get("search", "grid") != "grid"


def _annotation(dotted: str) -> Any:
    section, _, name = dotted.partition(".")
    hints = typing.get_type_hints(Config)
    if section not in hints or not dataclasses.is_dataclass(hints[section]):
        return None
    return typing.get_type_hints(hints[section]).get(name)


def _dotted(name: str, where: str) -> str:
    flags = entry_flags()
    dotted = flags[name][0] if name in flags else name
    if "." not in dotted or _annotation(dotted) is None:
        raise ConfigError(f"{where}: unknown knob {name!r}; expected one of {', '.join(sorted(flags))} or a "
                          "section.key such as local.max_span_tokens")
    return dotted


def _number(value: Any, where: str, *, integer: bool = False, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and not float(value).is_integer()) or value < (1 if positive else 0):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} is {value!r}; expected {kind} {'>= 1' if positive else '>= 0'}")
    return value


def _dimension(name: str, spec: Any, where: Callable[[str], str]) -> Dimension:
    at = where(f"space.{name}")
    dotted = _dotted(str(name), at)
    annotation = _annotation(dotted)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{at}: sweep.space.{name} must be a mapping such as {{low: 0.001, high: 0.03, log: "
                          f"true}} or {{choices: [1, 2, 3]}}, got {spec!r}")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        choices = spec["choices"]
        if extra or not isinstance(choices, list) or not choices or len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"{at}: sweep.space.{name}: choices must be a non-empty list of distinct values and "
                              f"nothing else, got {dict(spec)!r}")
        return Dimension(dotted, "categorical", choices=tuple(choices))
    extra = sorted(set(spec) - {"low", "high", "log", "step"})
    if extra or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{at}: sweep.space.{name} needs low and high (optionally log, step) or choices; got "
                          f"{', '.join(map(str, spec))}")
    if annotation not in (int, float):
        raise ConfigError(f"{at}: sweep.space.{name} is not a numeric knob ({getattr(annotation, '__name__', annotation)}); "
                          "give it choices: [...]")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{at}: sweep.space.{name}.{bound} is {value!r}; expected a finite number")
        if annotation is int and not float(value).is_integer():
            raise ConfigError(f"{at}: sweep.space.{name}.{bound} is {value!r}; {dotted} takes integers")
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: sweep.space.{name}.log is {log!r}; expected true or false")
    if not low < high:
        raise ConfigError(f"{at}: sweep.space.{name}: low {low!r} must be below high {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{at}: sweep.space.{name}: a log range needs low > 0, got {low!r}")
    step = spec.get("step")
    if step is not None:
        if log:
            raise ConfigError(f"{at}: sweep.space.{name}: step and log cannot be combined (Optuna's rule)")
        _number(step, f"{at}: sweep.space.{name}.step", integer=annotation is int, positive=annotation is int)
        if step <= 0:
            raise ConfigError(f"{at}: sweep.space.{name}.step is {step!r}; expected a number > 0")
    if annotation is int:
        return Dimension(dotted, "int", int(low), int(high), log, int(step) if step is not None else None)
    return Dimension(dotted, "float", float(low), float(high), log, float(step) if step is not None else None)


def plan_search(block: Any, source: str, lines: Mapping[str, int] | None = None) -> SearchPlan:
    """The search a `sweep:` block asks for, or a ConfigError naming `source:line` and the key. `lines` maps
    `sweep.<key>` (dotted, as `config.section_lines` returns) to its line in the file."""
    lines = lines or {}

    def where(key: str) -> str:
        parts = f"sweep.{key}".split(".")
        for end in range(len(parts), 0, -1):  # the key's own line, else its nearest parent's
            line = lines.get(".".join(parts[:end]))
            if line:
                return f"{source}:{line}"
        return source

    if not isinstance(block, Mapping):
        raise ConfigError(f"{source}: needs a sweep: block")
    unknown = sorted(set(block) - SETTINGS - {"grid", "max_grid_points"})
    if unknown:
        raise ConfigError(f"{where(unknown[0])}: sweep: unknown key {unknown[0]!r}; expected one of "
                          f"{', '.join(sorted(SETTINGS))}")
    if "grid" in block:
        raise ConfigError(f"{where('grid')}: sweep.grid is for search: grid; a {block['search']} search takes its "
                          "axes from sweep.space")
    method = block["search"]
    if method not in typing.get_args(Method):
        raise ConfigError(f"{where('search')}: sweep.search is {method!r}; expected grid, random or tpe")
    space = block.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{where('space')}: sweep.space must be a non-empty mapping of knob -> range or choices "
                          "(e.g. learning_rate: {low: 0.001, high: 0.03, log: true})")
    dimensions = tuple(_dimension(str(name), spec, where) for name, spec in space.items())
    keys = [d.key for d in dimensions]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{where('space')}: sweep.space names one knob twice (under its -P name and section.key)")

    def count(key: str, default: int, *, positive: bool = False) -> int:
        return int(_number(block.get(key, default), f"{where(key)}: sweep.{key}", integer=True, positive=positive))

    ceiling = count("max_trials", MAX_TRIALS, positive=True)
    if "n_trials" not in block:
        raise ConfigError(f"{where('n_trials')}: sweep.n_trials is required for a {method} search (trials in the "
                          "whole study, all workers together)")
    n_trials = count("n_trials", 0, positive=True)
    if n_trials > ceiling:
        raise ConfigError(f"{where('n_trials')}: sweep.n_trials is {n_trials}, over sweep.max_trials={ceiling}; "
                          "lower it or raise max_trials")
    pruner = block.get("pruner", "none")
    if pruner not in typing.get_args(PrunerName):
        raise ConfigError(f"{where('pruner')}: sweep.pruner is {pruner!r}; expected none, median or hyperband")
    for text in ("storage", "study_name"):
        if not isinstance(block.get(text, ""), str):
            raise ConfigError(f"{where(text)}: sweep.{text} is {block[text]!r}; expected a string")
    plan = SearchPlan(
        method=method, n_trials=n_trials, space=dimensions, pruner=pruner,
        pruner_warmup_steps=count("pruner_warmup_steps", 0), pruner_startup_trials=count("pruner_startup_trials", 3),
        hyperband_min_steps=count("hyperband_min_steps", 1, positive=True),
        hyperband_reduction_factor=count("hyperband_reduction_factor", 3, positive=True),
        storage=block.get("storage", ""), study_name=block.get("study_name", ""),
        max_parallel_jobs=count("max_parallel_jobs", 0),
        max_cost_usd=float(_number(block.get("max_cost_usd", 0), f"{where('max_cost_usd')}: sweep.max_cost_usd")),
        seed=count("seed", 0), sampler_startup_trials=count("sampler_startup_trials", 10))
    if plan.hyperband_reduction_factor < 2:
        raise ConfigError(f"{where('hyperband_reduction_factor')}: sweep.hyperband_reduction_factor is "
                          f"{plan.hyperband_reduction_factor}; expected an integer >= 2")
    corners = math.prod(len(d.corners()) for d in dimensions)
    if corners > MAX_CORNERS:
        raise ConfigError(f"{where('space')}: sweep.space has {corners} corners to price (over {MAX_CORNERS}); "
                          "use fewer choices")
    return plan


def check_space(plan: SearchPlan, config: Config, with_overrides: Callable[[Config, dict], Config], source: str,
                lines: Mapping[str, int] | None = None) -> list[Config]:
    """Every corner of the space validated as a full config (each value against its knob's bounds and the rules
    that span knobs), with the axis's file:line when one is refused; returns the corners' configs for pricing."""
    lines = lines or {}
    configs = []
    for corner in plan.corners():
        try:
            configs.append(with_overrides(config, corner))
        except ConfigError as e:
            bad = next((d for d in plan.space if d.key in str(e)), plan.space[0])
            name = next((n for n in lines if n.startswith("sweep.space.") and _same(n, bad.key)), "sweep.space")
            line = lines.get(name)
            raise ConfigError(f"{source}{f':{line}' if line else ''}: {name}: the space reaches a value the knob "
                              f"refuses: {str(e).split(': ', 1)[-1]}") from None
    return configs


def _same(line_key: str, dotted: str) -> bool:
    name = line_key.removeprefix("sweep.space.")
    flags = entry_flags()
    return name == dotted or (name in flags and flags[name][0] == dotted)

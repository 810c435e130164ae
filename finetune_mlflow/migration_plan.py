"""The pure half of `migrate`: read a `migration:` block into explicit candidate settings (not a grid: a provider
goes with its own models), refusing what cannot be run before anything launches. No MLflow and no network.

    migration:
      max_f1_loss: 2.0          # non-inferiority margin in F1 points (the 95% lower bound of the paired delta)
      max_agreement_loss: 10.0  # agreement with the champion's recorded answers may be at most this below 100
      prompts: data/traffic.jsonl   # optional: unlabelled prompts whose champion answers `capture` recorded
      candidates:               # each: provider and base model, plus any knob (flag name or section.key)
        - {provider: local, base_model: span-ranker-base, epochs: 2}
        - {provider: vertex, base_model: gemini-2.5-flash, epochs: 3, vertex.adapter_size: 4}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from finetune_mlflow.config import entry_flags
from finetune_mlflow.errors import ConfigError

SETTINGS = {"candidates", "max_f1_loss", "max_agreement_loss", "prompts"}
# What a candidate may not set: they would move it off the champion's registered model or its data split.
# (every data.* key too: candidates are tuned and scored on the champion's own prepared split).
FIXED = {"tune.registered_model_name"}


@dataclass(frozen=True)
class MigrationPlan:
    candidates: list[dict[str, Any]]  # each: dotted config key -> value
    max_f1_loss: float
    max_agreement_loss: float
    prompts: str


def _dotted(name: str, where: str) -> str:
    flags = entry_flags()
    dotted = flags[name][0] if name in flags else name
    if "." not in dotted:
        raise ConfigError(f"{where}: unknown key {name!r}; expected a -P name ({', '.join(sorted(flags))}) or a "
                          "section.key such as vertex.adapter_size")
    if dotted in FIXED or dotted.startswith("data."):
        raise ConfigError(f"{where}: {name} cannot differ between candidates: every candidate is registered under "
                          "the champion's model and scored on the champion's prepared split")
    return dotted


def _margin(block: Mapping[str, Any], key: str, source: str, default: float | None) -> float:
    value = block.get(key, default)
    if value is None:
        raise ConfigError(f"{source}: migration.{key} is required (F1 points a candidate may lose, e.g. 2.0)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise ConfigError(f"{source}: migration.{key} is {value!r}; expected a number of F1 points from 0 to 100")
    return float(value)


def plan_migration(block: Any, source: str) -> MigrationPlan:
    """The candidates of a `migration:` block, or a ConfigError naming the file and the key."""
    if not isinstance(block, Mapping) or not isinstance(block.get("candidates"), list) or not block["candidates"]:
        raise ConfigError(f"{source}: needs a migration: block with a non-empty candidates: list (e.g. - {{provider: "
                          "local, base_model: span-ranker-base}}) for the migrate entry point")
    unknown = sorted(set(block) - SETTINGS)
    if unknown:
        raise ConfigError(f"{source}: migration: unknown key {unknown[0]!r}; expected one of "
                          f"{', '.join(sorted(SETTINGS))}")
    candidates, seen = [], set()
    for index, entry in enumerate(block["candidates"], 1):
        where = f"{source}: migration.candidates[{index}]"
        if not isinstance(entry, Mapping) or not entry.get("provider") or not entry.get("base_model"):
            raise ConfigError(f"{where}: each candidate is a mapping with at least provider and base_model, got "
                              f"{entry!r}")
        point = {_dotted(str(k), where): v for k, v in entry.items()}
        key = json.dumps(point, sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"{where}: the same settings are listed twice")
        seen.add(key)
        candidates.append(point)
    prompts = block.get("prompts") or ""
    if not isinstance(prompts, str):
        raise ConfigError(f"{source}: migration.prompts must be a path to a JSONL or CSV file, got {prompts!r}")
    return MigrationPlan(candidates, _margin(block, "max_f1_loss", source, None),
                         _margin(block, "max_agreement_loss", source, 100.0), prompts)

"""Pure token and cost estimates shared by every provider's pre-flight check.

Estimates budget and warn before money is spent; they never bill. About four characters per English token is
the rule of thumb both OpenAI and Google document for their tokenizers.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from finetune_mlflow.errors import ConfigError

CHARS_PER_TOKEN = 4


def approx_tokens(text: str | None) -> int:
    """Estimated tokens of a text: characters / 4, rounded up; 0 for an empty text."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def billed_tokens(train_tokens: int, epochs: int) -> int:
    """Supervised tuning is billed per training token seen: tokens in the training file x epochs."""
    return int(train_tokens) * int(epochs)


def price_per_million(model: str, tables: Sequence[Mapping[str, float]]) -> float | None:
    """USD per 1M training tokens: the first table (in priority order) naming the model exactly or by the longest
    `key-` prefix (a dated snapshot such as gemini-2.0-flash-001 takes its family's price); None if none does."""
    for table in tables:
        if model in table:
            return float(table[model])
        prefixes = [key for key in table if model.startswith(f"{key}-")]
        if prefixes:
            return float(table[max(prefixes, key=len)])
    return None


def estimate_cost_usd(billed: int, price: float | None) -> float | None:
    return None if price is None else billed / 1_000_000 * price


def check_cost_limit(cost: float | None, limit: float, *, what: str, price_key: str) -> None:
    """The one cost guard, run before anything is launched: refuse above `limit` (0: no guard), and refuse when a
    limit is set but the cost cannot be estimated (no price for the model under `price_key`)."""
    if limit <= 0:
        return
    if cost is None:
        raise ConfigError(f"max_cost_usd is {limit:g} but the cost of {what} cannot be estimated: add the model's USD "
                          f"price per 1M training tokens under {price_key}, or set max_cost_usd to 0 to launch "
                          "without the guard")
    if cost > limit:
        raise ConfigError(f"estimated cost ${cost:.2f} of {what} exceeds max_cost_usd=${limit:g}; lower "
                          "data.max_examples or tune.epochs, or raise max_cost_usd")

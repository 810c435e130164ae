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


def matching_key(model: str, table: Mapping[str, object]) -> str | None:
    """`model` when the table names it exactly, else None. Never a prefix: `gemini-2.5-flash-lite` is not priced as
    `gemini-2.5-flash`, nor a new snapshot as its family; an unpriced model is refused by the cost guard instead."""
    return model if model in table else None


def price_per_million(model: str, tables: Sequence[Mapping[str, float]]) -> float | None:
    """USD per 1M training tokens: the first table (in priority order) naming `model`; None if none does."""
    for table in tables:
        key = matching_key(model, table)
        if key is not None:
            return float(table[key])
    return None


def estimate_cost_usd(billed: int, price: float | None) -> float | None:
    return None if price is None else billed / 1_000_000 * price


def check_cost_limit(cost: float | None, limit: float, *, what: str, price_key: str,
                     priced: str = "training tokens", setting: str = "max_cost_usd",
                     remedy: str = "lower data.max_examples or tune.epochs", unpriced: str = "") -> None:
    """The one cost guard, run before anything is launched or requested: refuse above `limit` (0: no guard), and
    refuse when a limit is set but the cost cannot be estimated (no price for `unpriced` under `price_key`)."""
    if limit <= 0:
        return
    if cost is None:
        missing = f"no price for {unpriced}" if unpriced else "a model has no price"
        raise ConfigError(f"{setting} is {limit:g} but the cost of {what} cannot be estimated: {missing} under "
                          f"{price_key} (prices match model names exactly); add its USD price per 1M {priced} "
                          f"there, dated, or set {setting} to 0 to go on without the guard")
    if cost > limit:
        raise ConfigError(f"estimated cost ${cost:.2f} of {what} exceeds {setting}=${limit:g}; {remedy}, or raise "
                          f"{setting}")


def token_price(model: str, base_model: str, table: Mapping[str, Mapping[str, float]]) -> tuple[float, float] | None:
    """USD per 1M (input, output) tokens of `model`, from a config table of {model: {input, output}}: an OpenAI
    fine-tuned model or checkpoint (`ft:<base>:org:suffix:id[:ckpt-step-N]`) under `ft:<base>`; another tuned
    model (a Vertex endpoint) at its base model's rate, which is how Vertex bills tuned Gemini models; any other
    model under its own name. Keys match exactly (`matching_key`). None when no entry fits."""
    if model.startswith("ft:"):
        name = "ft:" + model.split(":")[1]
    elif "/endpoints/" in model:
        name = base_model
    else:
        name = model.rsplit("/", 1)[-1]
    key = matching_key(name, table)
    if key is None:
        return None
    return float(table[key].get("input", 0.0)), float(table[key].get("output", 0.0))


def tokens_cost_usd(input_tokens: float, output_tokens: float, price: tuple[float, float]) -> float:
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000

"""What a run really cost, priced from the config's dated tables, and the cost guard run before an evaluation.

A provider bills when its config section carries price tables (openai, vertex); the local provider bills nothing
and gets no cost metric. Beside the pre-flight estimate (`estimated_cost_usd`), a run logs `cost_train_usd` (the
training tokens the provider reports as billed, `billed_training_tokens`, at the base model's training price),
`cost_eval_usd` (each model the run evaluated: its reported input/output tokens at its inference price),
`cost_total_usd`, and `cost_estimate_ratio` = cost_train_usd / estimated_cost_usd, so users learn how far to trust
the estimate. A missing price or token count leaves its metric out with a warning: never a made-up number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

from finetune_mlflow.config import Config
from finetune_mlflow.costing import approx_tokens, check_cost_limit, price_per_million, token_price, tokens_cost_usd
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt

logger = logging.getLogger(__name__)

BILLED_TOKENS = "billed_training_tokens"


@dataclass(frozen=True)
class TokenUsage:
    """Tokens one evaluated model consumed, as the provider reported them."""

    model: str
    input_tokens: float
    output_tokens: float


def bills(config: Config, provider: str) -> bool:
    """Whether the provider charges money: its config section has price tables (the local one has none)."""
    return hasattr(getattr(config, provider, None), "training_price_per_million_tokens")


def _inference_prices(config: Config, provider: str) -> Mapping[str, Mapping[str, float]]:
    return getattr(getattr(config, provider), "inference_price_per_million_tokens", {}) or {}


def estimate_eval_cost(examples: Sequence[dict], models: Sequence[str], config: Config, provider: str) -> float | None:
    """USD bound of evaluating `models` on `examples`: each prompt's estimated tokens in, `max_output_tokens` out
    (thinking tokens bill as output, so the cap is the honest bound), per model; 0 for a provider that bills
    nothing, None when a model has no inference price."""
    if not bills(config, provider) or not models:
        return 0.0
    prompt = approx_tokens(SYSTEM_INSTRUCTION)
    input_tokens = sum(prompt + approx_tokens(user_prompt(e["question"], e["context"])) for e in examples)
    output_tokens = len(examples) * config.evaluate.max_output_tokens
    total = 0.0
    for model in models:
        price = token_price(model, config.tune.base_model, _inference_prices(config, provider))
        if price is None:
            return None
        total += tokens_cost_usd(input_tokens, output_tokens, price)
    return total


def check_eval_cost(examples: Sequence[dict], models: Sequence[str], config: Config, provider: str) -> float | None:
    """Refuse, before the first request, an evaluation estimated above `evaluate.max_cost_usd` (0: no limit)."""
    cost = estimate_eval_cost(examples, models, config, provider)
    unpriced = [] if cost is not None else [
        m for m in models if token_price(m, config.tune.base_model, _inference_prices(config, provider)) is None]
    check_cost_limit(cost, config.evaluate.max_cost_usd, what=f"evaluating {len(models)} model(s) on "
                     f"{len(examples)} questions (nothing was requested)",
                     price_key=f"{provider}.inference_price_per_million_tokens", priced="input/output tokens",
                     setting="evaluate.max_cost_usd", remedy="lower data.max_validation_examples or "
                     "evaluate.max_output_tokens, or evaluate fewer checkpoints (evaluate.checkpoints: last)",
                     unpriced=", ".join(unpriced))
    return cost


def usage_of(model: str, metrics: Mapping[str, float]) -> TokenUsage | None:
    """The tokens an evaluation's summary reports (`eval_input_tokens`/`eval_output_tokens`), None if unreported."""
    if "eval_input_tokens" not in metrics and "eval_output_tokens" not in metrics:
        return None
    return TokenUsage(model, metrics.get("eval_input_tokens", 0.0), metrics.get("eval_output_tokens", 0.0))


def cost_metrics(billed_tokens: float | None, train_price: float | None, usages: Sequence[TokenUsage | None],
                 prices: Sequence[tuple[float, float] | None], estimated_usd: float | None) -> dict[str, float]:
    """Pure: the cost metrics the numbers allow (see the module docstring); `prices[i]` prices `usages[i]`."""
    out: dict[str, float] = {}
    if billed_tokens is not None and train_price is not None:
        out["cost_train_usd"] = billed_tokens / 1_000_000 * train_price
    if usages and all(u is not None for u in usages) and all(p is not None for p in prices):
        out["cost_eval_usd"] = sum(tokens_cost_usd(u.input_tokens, u.output_tokens, p)
                                   for u, p in zip(usages, prices))
    if "cost_train_usd" in out and "cost_eval_usd" in out:
        out["cost_total_usd"] = out["cost_train_usd"] + out["cost_eval_usd"]
    if "cost_train_usd" in out and estimated_usd:
        out["cost_estimate_ratio"] = out["cost_train_usd"] / estimated_usd
    return {key: round(value, 6) for key, value in out.items()}


def run_cost(provider: str, job_metrics: Mapping[str, float], config: Config, usages: Sequence[TokenUsage | None],
             run_metrics: Mapping[str, float]) -> dict[str, float]:
    """The cost metrics of a finished job's run, priced from `config` (none for a provider that bills nothing)."""
    if not bills(config, provider):
        return {}
    section = getattr(config, provider)
    base = config.tune.base_model.rsplit("/", 1)[-1]
    train_price = price_per_million(base, [section.training_price_per_million_tokens])
    prices = [token_price(u.model, config.tune.base_model, _inference_prices(config, provider)) if u else None
              for u in usages]
    metrics = cost_metrics(job_metrics.get(BILLED_TOKENS), train_price, usages, prices,
                           run_metrics.get("estimated_cost_usd"))
    missing = {"cost_train_usd", "cost_eval_usd"} - set(metrics)
    if missing:
        logger.warning("no %s for this run: the provider reported no billed tokens or token usage, or a model has "
                       "no price under %s.*_price_per_million_tokens", " or ".join(sorted(missing)), provider)
    return metrics

"""Every shipped experiment config loads, and the cloud ones keep the guards their comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_mlflow.providers.openai import data as openai_data
from finetune_mlflow.providers.vertex import data as gemini_data
from finetune_mlflow.costing import estimate_cost_usd
from finetune_mlflow.config import load_config

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
# Tokens per example, a generous upper estimate for the shipped SQuAD subset (passage + question + answer + prompt).
TOKENS_PER_EXAMPLE = 300


def test_the_shipped_experiments_are_all_there():
    assert {p.name for p in EXPERIMENTS} >= {"squad_local.yaml", "squad_openai.yaml", "squad_gemini_flash.yaml",
                                            "squad_gemini_pro.yaml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_loads(path):
    config = load_config(path)
    assert config.tune.registered_model_name


@pytest.mark.parametrize("name, provider, base_model", [
    ("squad_openai.yaml", "openai", "gpt-4o-mini-2024-07-18"),
    ("squad_gemini_flash.yaml", "vertex", "gemini-2.5-flash"),
    ("squad_gemini_pro.yaml", "vertex", "gemini-2.5-pro"),
])
def test_cloud_experiments_are_bounded(name, provider, base_model):
    config = load_config(Path(EXPERIMENTS[0]).parent / name)
    assert (config.tune.provider, config.tune.base_model) == (provider, base_model)
    assert 1 <= config.tune.epochs <= 3
    assert 0 < config.data.max_examples <= 2000 and 0 < config.data.max_validation_examples <= 1000
    assert config.tune.max_cost_usd > 0
    assert 1 <= config.evaluate.max_concurrency <= 8
    billed = config.data.max_examples * TOKENS_PER_EXAMPLE * config.tune.epochs
    if provider == "openai":
        cost = estimate_cost_usd(billed, openai_data.training_price(
            base_model, config.openai.training_price_per_million_tokens))
    else:
        assert config.tune.batch_size == 0  # Vertex has no batch size
        cost = estimate_cost_usd(billed, gemini_data.price_per_million(
            base_model, config.vertex.training_price_per_million_tokens))
    # The guard lets the configured run through with room to spare, and stops a 10x max_examples typo.
    assert cost is not None and cost < config.tune.max_cost_usd < 10 * cost
    names = {load_config(Path(EXPERIMENTS[0]).parent / n).tune.registered_model_name
             for n in ("squad_openai.yaml", "squad_gemini_flash.yaml", "squad_gemini_pro.yaml", "squad_local.yaml")}
    assert len(names) == 4  # one registered model per provider/base model

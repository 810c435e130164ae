"""Run names put what tells runs apart first: a sweep child starts with its grid values."""

from __future__ import annotations

import pytest

from finetune_mlflow import sweep
from finetune_mlflow.config import load_config
from finetune_mlflow.run_names import SWEEP_POINT_TAG, run_name, varied_keys
from finetune_mlflow.sweep_plan import point_key


def config(**overrides: str):
    return load_config(None, overrides)


@pytest.mark.parametrize("overrides, step, varied, name", [
    ({}, "tune", (), "tune local/span-ranker-base e3 lr0.005"),
    ({"max_examples": "300"}, "main", (), "main local/span-ranker-base e3 lr0.005 n300"),
    ({"epochs": "3", "learning_rate": "0.01"}, "tune", ("tune.epochs", "tune.learning_rate"),
     "e3 lr0.01 · local/span-ranker-base"),
    ({"epochs": "2"}, "tune", ("tune.epochs",), "e2 · local/span-ranker-base lr0.005"),
    ({"provider": "transformers", "base_model": "/models/SmolLM2-135M.gguf"}, "tune", ("tune.base_model",),
     "transformers/SmolLM2-135M · e3 lr0.005"),
    ({"provider": "vertex", "base_model": "gemini-2.5-flash", "vertex.adapter_size": "8"}, "tune",
     ("vertex.adapter_size", "tune.epochs"), "adapter_size=8 e3 · vertex/gemini-2.5-flash lr0.005"),
    ({"batch_size": "16", "max_examples": "200"}, "tune", ("tune.batch_size", "data.max_examples"),
     "batch_size=16 n200 · local/span-ranker-base e3 lr0.005"),
    ({"provider": "openai", "base_model": "gpt-4o-mini"}, "tune", ("tune.provider", "tune.base_model"),
     "openai/gpt-4o-mini · e3 lr0.005"),
])
def test_names_put_the_varied_keys_first(overrides, step, varied, name):
    assert run_name(config(**overrides), step, varied) == name


def test_the_plain_name_is_the_configs_own():
    assert config(epochs="2").run_name("tune") == run_name(config(epochs="2"), "tune")


@pytest.mark.parametrize("tag, keys", [
    (point_key({"tune.learning_rate": 0.01, "tune.epochs": 3}), ("tune.epochs", "tune.learning_rate")),
    (None, ()), ("", ()), ("not json", ()), ("[1, 2]", ()),
])
def test_the_varied_keys_come_from_the_sweep_point_tag(tag, keys):
    assert varied_keys(tag) == keys


def test_the_tag_name_is_the_one_sweep_writes():
    assert sweep.POINT_TAG == SWEEP_POINT_TAG


def test_six_children_of_the_shipped_sweep_differ_in_their_first_characters():
    """The runs table truncates names: the shipped grid's children must differ within the first 10 characters."""
    base = load_config("experiments/sweep_local.yaml")
    names = [run_name(config(epochs=str(e), learning_rate=str(lr)), "tune", ("tune.epochs", "tune.learning_rate"))
             for e in (1, 2, 3) for lr in (0.005, 0.01)]
    assert base.tune.provider == "local" and len({n[:10] for n in names}) == 6

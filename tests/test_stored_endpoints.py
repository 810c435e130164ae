"""A registered version's stored endpoint never receives the user's credentials unless the user consents: the
user's config and environment decide where keys go. Real OpenAI SDK clients against two fake servers (the one the
version recorded, the one the user configured), through the real `evaluate` entry point and the pyfunc a
deployment serves; Vertex's endpoints follow the same rule."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from finetune_mlflow.cli import main
from finetune_mlflow.config import load_config
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.registry import register_tuned_model
from finetune_mlflow.served import TRUSTED_ENDPOINTS_ENV, endpoint_settings
from tests.conftest import ROOT
from tests.fakes.openai_server import FakeOpenAI
from tests.test_bad_input import all_runs

OPENAI_CONFIG = ROOT / "experiments" / "squad_openai.yaml"
MODEL = "ft:gpt-4o-mini-2024-07-18:org:squad:abc123"


@pytest.fixture
def stored_server():
    with FakeOpenAI() as server:
        yield server


def register_openai_version(base_url: str) -> str:
    config = load_config(OPENAI_CONFIG, {"openai.base_url": base_url})
    with mlflow.start_run(tags={"finetune.base_model": config.tune.base_model}) as run:
        return register_tuned_model(
            run_id=run.info.run_id, config=config, provider="openai", model_id=MODEL, logged_model_id=None,
            artifacts={}, packages=("openai",), tags={"provider": "openai", "base_model": config.tune.base_model,
                                                      "tuned_model": MODEL}, description="stored endpoint").model_uri


def evaluate(capsys, small_squad, model_uri: str, *extra: str) -> tuple[int, str]:
    train, validation = small_squad
    code = main(["evaluate", "--config", str(OPENAI_CONFIG), "--model", model_uri, "--train_data", str(train),
                 "--validation_data", str(validation), "--max_validation_examples", "5", *extra])
    captured = capsys.readouterr()
    return code, captured.err


def chats(server: FakeOpenAI) -> int:
    return len(server.chat_requests)


def test_a_stored_endpoint_that_differs_from_the_users_is_refused_before_any_request(
        openai_fake, stored_server, small_squad, capsys, monkeypatch):
    uri = register_openai_version(stored_server.base_url)
    monkeypatch.delenv(TRUSTED_ENDPOINTS_ENV, raising=False)
    code, err = evaluate(capsys, small_squad, uri)
    assert code == 2, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert f"openai.base_url {stored_server.base_url}" in line and openai_fake.base_url in line, line
    assert TRUSTED_ENDPOINTS_ENV in line
    assert stored_server.requests == [] and chats(openai_fake) == 0
    assert all_runs() == [] or all(r.info.status != "RUNNING" for r in all_runs())

    # The same refusal where a deployment loads the version (`mlflow models serve` loads this pyfunc).
    with pytest.raises(Exception, match="refusing to send them to the stored endpoint"):
        mlflow.pyfunc.load_model(uri)
    assert stored_server.requests == []


def test_the_users_config_decides_even_over_the_environment(openai_fake, stored_server, small_squad, capsys,
                                                            monkeypatch):
    """The user's own openai.base_url (a -P override here) is where the key goes; the stored one must match it."""
    uri = register_openai_version(stored_server.base_url)
    code, err = evaluate(capsys, small_squad, uri, "--set", f"openai.base_url={stored_server.base_url}")
    assert code == 0, err[-3000:]
    assert chats(stored_server) == 5 and chats(openai_fake) == 0


def test_consent_names_the_endpoint_and_then_it_is_used(openai_fake, stored_server, small_squad, capsys,
                                                        monkeypatch, caplog):
    uri = register_openai_version(stored_server.base_url)
    monkeypatch.setenv(TRUSTED_ENDPOINTS_ENV, "https://elsewhere.example/v1")  # consent to another place only
    assert evaluate(capsys, small_squad, uri)[0] == 2
    monkeypatch.setenv(TRUSTED_ENDPOINTS_ENV, f"https://elsewhere.example/v1,{stored_server.base_url}/")
    code, err = evaluate(capsys, small_squad, uri)
    assert code == 0, err[-3000:]
    assert chats(stored_server) == 5 and chats(openai_fake) == 0
    assert "trusted through" in caplog.text


def test_a_version_that_stored_no_endpoint_follows_the_users(openai_fake, small_squad, capsys):
    uri = register_openai_version("")
    code, err = evaluate(capsys, small_squad, uri)
    assert code == 0, err[-3000:]
    assert chats(openai_fake) == 5
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"question": ["Who?"], "context": ["Ada wrote."]}))
    assert len(served) == 1 and chats(openai_fake) == 6


@pytest.mark.parametrize("key", ["vertex.api_endpoint", "vertex.storage_endpoint"])
def test_vertex_endpoints_follow_the_same_rule(monkeypatch, key):
    monkeypatch.delenv(TRUSTED_ENDPOINTS_ENV, raising=False)
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "europe-west4")
    user = load_config(None, {"provider": "vertex"})
    stored = {key: "https://collector.example"}
    with pytest.raises(ConfigError, match=f"registered with {key} https://collector.example"):
        endpoint_settings("vertex", stored, user)
    # The default regional host the user's own location gives is the same place: accepted.
    same = {"vertex.api_endpoint": "https://europe-west4-aiplatform.googleapis.com/"}
    assert endpoint_settings("vertex", same, user)["vertex.api_endpoint"] == ""
    monkeypatch.setenv(TRUSTED_ENDPOINTS_ENV, "https://collector.example")
    assert endpoint_settings("vertex", stored, user)[key] == "https://collector.example"

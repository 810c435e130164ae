"""Registering a hosted tuned model makes no request to it: the signature and the input example are saved, but
MLflow does not predict the example at log time (that would be two paid calls per registration, and a
registration that fails whenever the endpoint is down). Real OpenAI client, fake server."""

from __future__ import annotations

import mlflow
from mlflow.models import Model

from finetune_mlflow.config import load_config
from finetune_mlflow.registry import register_tuned_model
from tests.conftest import ROOT


def test_registering_an_openai_model_sends_no_chat_request(openai_fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(ROOT / "experiments" / "squad_openai.yaml", {"openai.base_url": openai_fake.base_url})
    with mlflow.start_run() as run:
        version = register_tuned_model(run_id=run.info.run_id, config=config, provider="openai",
                                       model_id="ft:gpt-4o-mini-2024-07-18:org:squad:abc123", artifacts={},
                                       logged_model_id=None, packages=("openai",),
                                       tags={"provider": "openai"}, description="no calls")
    assert openai_fake.chat_requests == []
    assert [r for r in openai_fake.requests if "chat" in r[1]] == []
    saved = Model.load(version.model_uri)
    assert saved.signature is not None and saved.saved_input_example_info is not None
    assert saved.load_input_example(mlflow.artifacts.download_artifacts(version.model_uri)) is not None

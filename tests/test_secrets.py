"""Secrets in the environment never reach the tracking store, the artifact store, job files or the console.

(The providers' own error messages and logs are covered in test_openai_provider.py
`test_secrets_never_appear_in_errors_or_logs` and test_vertex_provider.py
`test_wrong_token_is_an_auth_error_without_the_token`.)
"""

from __future__ import annotations

from tests.e2e_support import all_experiment_ids
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT

SECRETS = {
    "OPENAI_API_KEY": "sk-SECRET-openai-0123456789abcdefghijklmnopqrstuv",
    "OPENAI_ORG_ID": "org-SECRET-organization-4242",
    "GOOGLE_API_KEY": "AIzaSECRET-google-api-key-0123456789abcd",
    "GEMINI_API_KEY": "AIzaSECRET-gemini-api-key-9876543210zyxw",
    "GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.SECRET-google-oauth-token-abcdefghij",
    "FINETUNE_VERTEX_ACCESS_TOKEN": "ya29.SECRET-vertex-access-token-0123456789",
    "MLFLOW_TRACKING_PASSWORD": "SECRET-tracking-password-5555",
}
# Distinctive parts of each value: a leak of a shortened or re-quoted secret is still caught.
NEEDLES = sorted({value.encode() for value in SECRETS.values()} | {b"SECRET-"})


def leaks_in(data: bytes) -> list[str]:
    return [needle.decode() for needle in NEEDLES if needle in data]


def test_tune_leaks_no_secret(small_squad, tmp_path):
    train, validation = small_squad
    env = {**os.environ, **SECRETS}
    result = subprocess.run(
        [sys.executable, "-m", "finetune_mlflow", "tune", "--config", str(ROOT / "experiments" / "squad_local.yaml"),
         "--train_data", str(train), "--validation_data", str(validation), "--max_examples", "200", "--epochs", "1"],
        env=env, cwd=tmp_path, capture_output=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-5000:]
    assert leaks_in(result.stdout) == [] and leaks_in(result.stderr) == []

    # The run really wrote what is being scanned: the SQLite store, artifacts under ./mlruns, the job directory.
    run = MlflowClient().search_runs(all_experiment_ids(), "tags.`finetune.step` = 'tune'")[0]
    assert run.info.status == "FINISHED"
    artifact_root = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifact_root.is_relative_to(tmp_path), run.info.artifact_uri
    scanned = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    names = {p.name for p in scanned}
    assert {"mlflow.db", "config.yaml", "MLmodel", "events.jsonl", "spec.json", "train.jsonl"} <= names
    assert any(p.is_relative_to(tmp_path / "mlruns") for p in scanned)
    assert any(p.is_relative_to(Path(os.environ["FINETUNE_MLFLOW_HOME"])) for p in scanned)

    leaks = {str(path.relative_to(tmp_path)): found for path, data in scanned.items() if (found := leaks_in(data))}
    assert leaks == {}

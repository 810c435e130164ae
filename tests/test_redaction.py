"""A provider's job error that echoes the caller's API key (and other key-shaped strings) reaches no run tag, no
end reason and no line of the process's output: the real `tune` command line against the fake OpenAI server,
whose job fails with such a message."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from finetune_mlflow.redaction import redact
from tests import e2e_support as e2e
from tests.conftest import OPENAI_TEST_KEY
from tests.fakes.openai_server import JobScript
from tests.test_e2e_openai import tune_parameters

OTHER_KEYS = ["sk-proj-notinenv0123456789abcdef", "AIzaSyNOTINENV0123456789abcdefghijk", "AKIAIOSFODNN7EXAMPLE",
              "hf_abcdefghijklmnopqrstuvwxyz0123"]


def test_a_job_error_echoing_keys_is_redacted_in_tags_and_output(openai_fake, small_squad, tmp_path):
    echoed = (f"Invalid request with api key {OPENAI_TEST_KEY} (also tried {', '.join(OTHER_KEYS)}); "
              f"Authorization: Bearer {OPENAI_TEST_KEY}")
    openai_fake.script_next_job(JobScript(statuses=["validating_files", "failed"],
                                          error={"code": "invalid_api_key", "message": echoed, "param": None}))
    args = ["tune"] + [f"--{key}={value}" for key, value in tune_parameters(small_squad).items()]
    log = tmp_path / "tune.log"
    process = e2e.start_cli(args, log)
    assert process.wait(timeout=300) == 2
    output = log.read_text()
    assert "error: " in output and "Invalid request with api key ***" in output, output[-3000:]
    runs = MlflowClient().search_runs(e2e.all_experiment_ids())
    assert runs
    written = [output] + [value for run in runs for value in (*run.data.tags.values(), *run.data.params.values())]
    for secret in [OPENAI_TEST_KEY, *OTHER_KEYS]:
        assert not [text for text in written if secret in text], secret
    (tune,) = [r for r in runs if r.data.tags.get("finetune.step") == "tune"]
    assert tune.data.tags["finetune.error_message"].startswith("Invalid request with api key ***")
    assert "***" in tune.data.tags["finetune.end_reason"]


@pytest.mark.parametrize("text,environ,expected", [
    ("key sk-abcdefgh12345678 ok", {}, "key *** ok"),
    ("short sk-abc stays", {}, "short sk-abc stays"),  # too short to be a key
    ("value hunter2hunter2 in text", {"DB_PASSWORD": "hunter2hunter2"}, "value *** in text"),
    ("flag true stays", {"SOME_TOKEN": "true"}, "flag true stays"),  # too short to mask safely
    ("ya29.a0AfH6SMBexampletoken and ASIAABCDEFGHIJKLMNOP", {}, "*** and ***"),
    ("", {"API_KEY": "whatever-long"}, ""),
])
def test_redact_table(text, environ, expected):
    assert redact(text, environ) == expected

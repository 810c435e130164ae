"""`sync` never takes over a run that a live `tune` owns: a real `tune` process watching its local job, and the
real `sync` command naming that job, then every job."""

from __future__ import annotations

import signal

import pytest

from finetune_mlflow.cli import main
from tests.conftest import ROOT
from tests.test_crash_local import CONFIG
from tests.test_signals import training


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def test_sync_leaves_a_run_that_a_live_tune_owns_untouched(small_squad, tmp_path, capsys):
    client, run_id, log, process = training(small_squad, tmp_path)
    train, validation = small_squad
    try:
        before = client.get_run(run_id)
        job_id = before.data.tags["finetune.job_id"]
        for target in (job_id, "all"):
            code = main(["sync", "--config", str(CONFIG), "--job_id", target, "--train_data", str(train),
                         "--validation_data", str(validation)])
            out = capsys.readouterr().out
            assert code == 0
            assert f"{job_id}: running -> run {run_id}" in out and "not synced: run" in out and "in use by" in out, out
            during = client.get_run(run_id)
            assert during.info.status == "RUNNING", "sync ended a run a live tune owns"
            assert during.data.tags["finetune.owner"] == before.data.tags["finetune.owner"]
            assert "finetune.registered_version" not in during.data.tags
        assert process.poll() is None, log.read_text()[-3000:]  # the tune goes on watching its job
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    assert client.get_run(run_id).info.status == "KILLED"

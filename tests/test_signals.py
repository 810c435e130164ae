"""Every signal that ends an entry point ends its runs, like SIGTERM: a real `tune` process, a real signal sent
while its job trains, and the runs it opened read back from the store. A signal the caller chose to ignore
(`nohup` ignores SIGHUP) is still ignored."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import ROOT
from tests.test_bad_input import all_runs
from tests.test_crash_local import tune_command, wait_for
from tests.test_crash_round_two import new_run


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def training(small_squad, tmp_path, *, ignore: tuple[int, ...] = ()):
    """A tune process on a fresh run, returned once its job has logged a training loss."""
    client, run_id = new_run()
    log = tmp_path / "tune.log"

    def ignoring() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test worker may have inherited SIGINT ignored
        for signum in ignore:
            signal.signal(signum, signal.SIG_IGN)

    with log.open("ab") as handle:
        process = subprocess.Popen(tune_command(small_squad, "--epochs", "100", "--batch_size", "1"),
                                   env={**os.environ, "MLFLOW_RUN_ID": run_id}, stdout=handle,
                                   stderr=subprocess.STDOUT, preexec_fn=ignoring)
    wait_for(lambda: len(client.get_metric_history(run_id, "train_loss")) > 0, process, log)
    return client, run_id, log, process


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_that_ends_tune_ends_its_runs_killed(small_squad, tmp_path, signum):
    client, run_id, log, process = training(small_squad, tmp_path)
    try:
        process.send_signal(signum)
        assert process.wait(timeout=60) == 128 + signum, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "runs ended KILLED" in errors[0], errors
    if signum != signal.SIGINT:
        assert errors[0].startswith(f"error: terminated by {signal.Signals(signum).name};")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["finetune.end_reason"], run.data.tags
    assert [r.info.run_id for r in all_runs() if r.info.status == "RUNNING"] == []


def test_sighup_ignored_by_the_caller_keeps_tune_running(small_squad, tmp_path):
    client, run_id, log, process = training(small_squad, tmp_path, ignore=(signal.SIGHUP,))
    try:
        process.send_signal(signal.SIGHUP)
        seen = len(client.get_metric_history(run_id, "train_loss"))
        # Still working after the hang-up: more losses arrive from the same process.
        wait_for(lambda: len(client.get_metric_history(run_id, "train_loss")) > seen, process, log)
        assert client.get_run(run_id).info.status == "RUNNING"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert client.get_run(run_id).info.status == "KILLED"

"""What the real OpenAI API does that the fake once did not (issue 22): paused jobs, unknown statuses, the events'
`total_steps`, and `max_completion_tokens`. Real `openai` client against the loopback fake."""

from __future__ import annotations

import logging

from openai import OpenAI

from finetune_mlflow.progress import Progress
from finetune_mlflow.providers.base import JobState
from tests.fakes.openai_server import JobScript
from tests.test_openai_provider import (  # noqa: F401 - fixtures
    API_KEY,
    make_provider,
    make_request,
    openai_env,
    server,
    sleeps,
    write_prepared,
)


def test_a_job_paused_from_the_dashboard_is_watched_not_failed(tmp_path, make_provider, server, caplog):
    server.script_next_job(JobScript(statuses=["validating_files", "queued", "running", "paused", "paused", "running",
                                               "succeeded"]))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    caplog.set_level(logging.WARNING, logger="finetune_mlflow")
    seen = []
    for _ in range(10):
        job = provider.get_job(job_id)
        seen.append((job.provider_status, job.state))
        if job.state is JobState.SUCCEEDED:
            break
    assert ("paused", JobState.RUNNING) in seen and seen[-1] == ("succeeded", JobState.SUCCEEDED)
    assert caplog.text.count("is paused: alive but not training") == 1  # said once, not every poll
    paused = provider.get_job(job_id).__class__(job_id, JobState.RUNNING, "paused", total_steps=6)
    assert Progress(started=0.0).line(paused, 5.0).startswith("paused")


def test_pause_and_resume_through_the_sdk_keep_the_job_alive(tmp_path, make_provider, server):
    server.script_next_job(JobScript(statuses=["running", "running", "running", "succeeded"]))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    client = OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    try:
        assert client.fine_tuning.jobs.pause(job_id).status == "paused"
        for _ in range(3):  # a paused job does not move, however often it is polled
            job = provider.get_job(job_id)
            assert (job.provider_status, job.state) == ("paused", JobState.RUNNING)
        assert client.fine_tuning.jobs.resume(job_id).status == "running"
    finally:
        client.close()
    assert provider.get_job(job_id).state is JobState.RUNNING


def test_an_unknown_status_is_logged_and_watched(tmp_path, make_provider, server, caplog):
    server.script_next_job(JobScript(statuses=["queued", "migrating_region", "running", "succeeded"]))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    caplog.set_level(logging.WARNING, logger="finetune_mlflow")
    job = provider.get_job(job_id)
    assert (job.provider_status, job.state) == ("migrating_region", JobState.RUNNING)
    assert "'migrating_region', which this version does not know" in caplog.text
    assert provider.get_job(job_id).state is JobState.RUNNING


def test_total_steps_from_metric_events_gives_an_eta(tmp_path, make_provider, server):
    server.script_next_job(JobScript(statuses=["queued"] + ["running"] * 4 + ["succeeded"], n_steps=12))
    provider = make_provider()
    job_id = provider.start_job(make_request(write_prepared(tmp_path))).job_id
    progress, cursor, now = Progress(started=0.0), None, 0.0
    lines = []
    for _ in range(8):
        job = provider.get_job(job_id)
        page = provider.read_metrics(job_id, cursor)
        cursor, now = page.next_cursor, now + 10.0
        progress.update(page.points, now)
        lines.append(progress.line(job, now))
        if job.state is JobState.SUCCEEDED:
            break
    assert job.total_steps == 12
    assert any("/12" in line and "ETA" in line for line in lines), lines


def test_reasoning_models_get_max_completion_tokens(make_provider, server):
    prediction = make_provider().predict("o4-mini", "Who wrote it?", "Ann wrote it.")
    assert prediction.text == "fake answer"
    sent = server.chat_requests[-1]
    assert sent["max_completion_tokens"] == 16 and "max_tokens" not in sent

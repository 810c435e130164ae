"""What one request to a served version may cost: a real `mlflow models serve` of a registered local version
answers malformed or oversized requests with a 400 naming the row, field and limit, and answers a long context
within the limits without its memory following the context's length."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from finetune_mlflow.providers.local.provider import WINDOW_TOKENS
from finetune_mlflow.request_limits import MAX_CONTEXT_CHARS, MAX_QUESTION_CHARS, MAX_REQUEST_CHARS, MAX_ROWS
from tests import team_servers as team
from tests.test_registered_versions import register_local_version

CONTEXT = "The city was founded in 1257 by merchants from the north, who built its first walls."


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of a process and its children (the scoring server's workers), in MB."""
    total = 0.0
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rows(*data: list) -> dict:
    return {"dataframe_split": {"columns": ["question", "context"], "data": list(data)}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registered local version behind `mlflow models serve` (one server for the module's cases)."""
    folder = tmp_path_factory.mktemp("serve")
    uri_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
               "FINETUNE_MLFLOW_HOME": str(folder / "home")}
    saved = {k: os.environ.get(k) for k in uri_env}
    os.environ.update(uri_env)
    import mlflow

    mlflow.set_tracking_uri(uri_env["MLFLOW_TRACKING_URI"])
    try:
        uri = register_local_version()
    finally:
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    port = team.free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with team.background(command, env={**os.environ, **uri_env}, log=folder / "serve.log",
                         ready_url=f"http://127.0.0.1:{port}/ping") as process:
        yield port, process


REFUSED = [
    ("null question", rows([None, CONTEXT]), "row 0: question is null"),
    ("null context", rows(["When?", CONTEXT], ["Who?", None]), "row 1: context is null"),
    ("number as question", rows([7, CONTEXT]), "row 0: question is a int"),
    ("context one past the limit", rows(["When?", "a" * (MAX_CONTEXT_CHARS + 1)]),
     f"at most {MAX_CONTEXT_CHARS:,}"),
    ("question one past the limit", rows(["w" * (MAX_QUESTION_CHARS + 1), CONTEXT]),
     f"at most {MAX_QUESTION_CHARS:,}"),
    ("too many rows", rows(*[["When?", "x"]] * (MAX_ROWS + 1)), f"at most {MAX_ROWS}"),
    ("too much text in total", rows(*[["When?", "b" * MAX_CONTEXT_CHARS]] * (MAX_REQUEST_CHARS // MAX_CONTEXT_CHARS
                                                                           + 1)), f"{MAX_REQUEST_CHARS:,}"),
    ("missing column", {"dataframe_split": {"columns": ["question"], "data": [["When?"]]}}, "missing inputs ['context']"),
]


@pytest.mark.parametrize("name,payload,message", REFUSED, ids=[case[0] for case in REFUSED])
def test_a_bad_or_oversized_request_is_a_400_naming_the_row_and_limit(served, name, payload, message):
    port, _ = served
    status, body = post(port, payload)
    assert status == 400, (status, body)
    assert message in body["message"], body["message"]


def test_a_long_context_within_the_limit_is_answered_in_bounded_memory(served):
    port, process = served
    status, body = post(port, rows(["When was the city founded?", CONTEXT]))
    assert status == 200 and body["predictions"][0]["answer"]
    before = peak_rss_mb(process.pid)
    # Many windows' worth of text (about 40 tokens a sentence, ~200 KB); the answer's sentence is in the middle.
    filler = "The harbour keeps old ships and quiet piers along the grey water of the northern bay . " * 1200
    context = filler + CONTEXT + " " + filler
    assert len(context.split()) > 4 * WINDOW_TOKENS
    status, body = post(port, rows(["When was the city founded?", context]))
    assert status == 200, body
    answer = body["predictions"][0]["answer"]
    assert answer and answer in CONTEXT, answer  # from the one sentence about the question, windows away
    grown = peak_rss_mb(process.pid) - before
    # Before windows: ~500 MB of peak per MB of context (about 100 MB here); now the windows bound it.
    assert grown < 40, f"serving peak grew {grown:.0f} MB for a {len(context) / 1e6:.2f} MB context"


@pytest.mark.parametrize("text,max_tokens,pieces", [
    ("", 4, [""]),
    ("Ada wrote it.", 4, ["Ada wrote it."]),
    ("One two. Three four five. Six", 4, ["One two.", " Three four five.", " Six"]),
    ("one two three four five six seven", 3, ["one two three", " four five six", " seven"]),
    ("A b. C d. E f. G", 100, ["A b. C d. E f. G"]),
    ("Tail. ", 1, ["Tail", ". "]),
])
def test_windows_cover_the_text_in_pieces_of_bounded_tokens(text, max_tokens, pieces):
    from finetune_mlflow.providers.local.span_features import TOKEN, windows

    found = list(windows(text, max_tokens))
    assert found == pieces and "".join(found) == text
    assert all(len(TOKEN.findall(piece)) <= max_tokens for piece in found)

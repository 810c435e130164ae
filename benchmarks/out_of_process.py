"""A fake OpenAI server in its own process, so a benchmark's client does not share a GIL with the server.

`python -m benchmarks.out_of_process --delay 0.05` prints the base URL on its first line and serves chat
completions (each answered after `--delay` seconds) until its stdin closes; `fake_openai_process` wraps that.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from typing import Iterator


def serve(delay_s: float) -> None:
    from http.server import ThreadingHTTPServer

    from tests.fakes.openai_server import FakeOpenAI

    ThreadingHTTPServer.request_queue_size = 256  # this process only: bursts of new connections at high concurrency
    with FakeOpenAI() as server:
        server.chat_responder = lambda body: "Ada Lovelace"
        server.inject(r"/v1/chat/completions", status=None, times=None, delay_s=delay_s)
        print(server.base_url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


@contextlib.contextmanager
def fake_openai_process(delay_s: float) -> Iterator[str]:
    """Yield the base URL of a fake OpenAI server running in a child process; stop it on exit."""
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.out_of_process", "--delay", str(delay_s)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield child.stdout.readline().strip()
    finally:
        child.stdin.close()
        child.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.05)
    serve(parser.parse_args().delay)

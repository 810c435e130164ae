"""Benchmark: remote evaluation throughput against its limit, N requests at concurrency C with server latency L.

The limit is ceil(N/C)*L (C requests in flight all the time, nothing but server latency); the figure is
limit / wall time (1.0 = the client adds nothing). The fake OpenAI server runs in its own process, so its CPU does
not compete with the evaluator's for one GIL; the real `openai` SDK talks to it. Reference in the same run:
sequential evaluation of the same requests (its fraction says how far the machine itself is from ideal).
`--async-client` also times the alternative the issue proposed, `openai.AsyncOpenAI` with an asyncio gather
bounded by a semaphore (one client, httpx pool limits sized to C), on the same requests in the same run.
Usage (repository root): `python -m benchmarks.bench_eval_concurrency [--quick] [--requests 512] [--delay 0.05]
[--reps 3] [--concurrency 8 16 32 64]`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
from typing import Callable

from benchmarks.out_of_process import fake_openai_process
from finetune_mlflow.config import load_config
from finetune_mlflow.evaluation import EvaluationRun, run_predictions
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, user_prompt
from finetune_mlflow.providers import get_provider


def examples(n: int) -> list[dict]:
    return [{"id": str(i), "question": f"Who wrote note {i}?", "context": "Ada Lovelace wrote the notes.",
             "answers": ["Ada Lovelace"]} for i in range(n)]


def evaluate(base_url: str, rows: list[dict], concurrency: int) -> EvaluationRun:
    """What the evaluate step does for a remote provider: its batched path when it has one, else the pool."""
    config = load_config(None, {"provider": "openai", "openai.base_url": base_url,
                                "max_concurrency": str(concurrency)})
    provider = get_provider("openai", config)
    try:
        run = run_predictions(lambda q, c: provider.predict("ft:gpt-4o-mini:bench", q, c), rows, concurrency)
    finally:
        provider.close()
    assert all(r.prediction == "Ada Lovelace" for r in run.results), "a request failed"
    return run


async def _gather(base_url: str, rows: list[dict], concurrency: int) -> float:
    """Wall seconds for the same chat requests through one AsyncOpenAI client, `concurrency` in flight."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = openai.AsyncOpenAI(base_url=base_url, max_retries=0, http_client=openai.DefaultAsyncHttpxClient(
        limits=limits))
    gate = asyncio.Semaphore(concurrency)

    async def one(row: dict) -> str:
        messages = [{"role": "system", "content": SYSTEM_INSTRUCTION},
                    {"role": "user", "content": user_prompt(row["question"], row["context"])}]
        async with gate:
            response = await client.chat.completions.create(model="ft:gpt-4o-mini:bench", messages=messages,
                                                            temperature=0, max_tokens=32)
        return response.choices[0].message.content

    started = time.monotonic()
    answers = await asyncio.gather(*(one(row) for row in rows))
    wall = time.monotonic() - started
    await client.close()
    assert all(answer == "Ada Lovelace" for answer in answers), "a request failed"
    return wall


CPU_MS: list[float] = []  # the evaluating process's CPU per request, one entry per timed repetition


def _timed(run: Callable[[], float], n: int) -> float:
    cpu = time.process_time()
    wall = run()
    CPU_MS.append((time.process_time() - cpu) * 1000.0 / n)
    return wall


def fractions(base_url: str, rows: list[dict], concurrency: int, delay: float, reps: int,
              use_async: bool = False) -> list[float]:
    limit = math.ceil(len(rows) / concurrency) * delay
    if use_async:
        return [limit / _timed(lambda: asyncio.run(_gather(base_url, rows, concurrency)), len(rows))
                for _ in range(reps)]
    return [limit / _timed(lambda: evaluate(base_url, rows, concurrency).wall_seconds, len(rows))
            for _ in range(reps)]


def line(label: str, got: list[float], reference: list[float], n: int, limit: float) -> str:
    """The fraction, and the ceiling the client's own CPU puts on it: one process (one GIL) cannot finish n
    requests faster than n x its CPU per request, whatever the concurrency."""
    median = statistics.median(got)
    cpu_ms = statistics.median(CPU_MS[-len(got):])
    ceiling = min(1.0, limit / (n * cpu_ms / 1000.0))
    return (f"{label}: fraction of limit {median:.2f} (range {min(got):.2f}-{max(got):.2f}); "
            f"vs C=1 reference {median / statistics.median(reference):.2f}; client CPU {cpu_ms:.2f} ms/request, "
            f"CPU-bound ceiling {ceiling:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the fake takes per completion")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--async-client", action="store_true", help="also time AsyncOpenAI + asyncio.gather")
    parser.add_argument("--quick", action="store_true", help="256 requests, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.reps = 256, 2
    os.environ["OPENAI_API_KEY"] = "sk-bench-0000000000000000000000000000"
    rows = examples(args.requests)
    print(f"N={args.requests} L={args.delay * 1000:.0f} ms, {args.reps} repetitions, load {os.getloadavg()[0]:.1f}")
    with fake_openai_process(args.delay) as base_url:
        evaluate(base_url, rows[:32], 8)  # warm-up: imports, connections
        reference = fractions(base_url, rows[:32], 1, args.delay, args.reps)
        print(line("reference C=1 (32 requests)", reference, reference, 32, 32 * args.delay))
        for concurrency in args.concurrency:
            limit = math.ceil(len(rows) / concurrency) * args.delay
            print(line(f"C={concurrency:>2}, thread pool (evaluate)", fractions(
                base_url, rows, concurrency, args.delay, args.reps), reference, len(rows), limit))
            if args.async_client:
                print(line(f"C={concurrency:>2}, AsyncOpenAI gather     ", fractions(
                    base_url, rows, concurrency, args.delay, args.reps, use_async=True), reference, len(rows),
                    limit))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

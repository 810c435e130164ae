"""Benchmark: remote evaluation throughput against its limit, N requests at concurrency C with server latency L.

The limit is ceil(N/C)*L (C requests in flight all the time, nothing but server latency); the figure is
limit / wall time (1.0 = the client adds nothing). The fake OpenAI server runs in its own process, so its CPU does
not compete with the evaluator's for one GIL; the real `openai` SDK talks to it. Reference in the same run:
sequential evaluation of the same requests (its fraction says how far the machine itself is from ideal).
Usage (repository root): `python -m benchmarks.bench_eval_concurrency [--quick] [--requests 512] [--delay 0.05]
[--reps 3] [--concurrency 8 16 32 64]`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

from benchmarks.out_of_process import fake_openai_process
from finetune_mlflow.config import load_config
from finetune_mlflow.evaluation import EvaluationRun, run_predictions
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


def fractions(base_url: str, rows: list[dict], concurrency: int, delay: float, reps: int) -> list[float]:
    limit = math.ceil(len(rows) / concurrency) * delay
    return [limit / evaluate(base_url, rows, concurrency).wall_seconds for _ in range(reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the fake takes per completion")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16, 32, 64])
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
        print(f"reference C=1 (32 requests): fraction of limit {statistics.median(reference):.2f} "
              f"(range {min(reference):.2f}-{max(reference):.2f})")
        for concurrency in args.concurrency:
            got = fractions(base_url, rows, concurrency, args.delay, args.reps)
            print(f"C={concurrency:>2}: fraction of limit {statistics.median(got):.2f} "
                  f"(range {min(got):.2f}-{max(got):.2f}); vs C=1 reference {statistics.median(got) / statistics.median(reference):.2f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

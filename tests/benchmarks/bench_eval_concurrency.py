"""Benchmark: evaluating a remote endpoint sequentially vs with bounded concurrency (`evaluate.max_concurrency`).

The real `openai` client calls the in-process fake OpenAI server, which answers every chat completion after a
fixed delay standing in for model latency. Both settings run side by side in one process; the ratio is the point.
Usage (from the repository root): `python -m tests.benchmarks.bench_eval_concurrency [--requests 120] [--delay 0.05] [--concurrency 8]`.
"""

from __future__ import annotations

import argparse
import os

from finetune_mlflow.config import load_config
from finetune_mlflow.evaluation import run_predictions, summarize
from finetune_mlflow.providers import get_provider
from tests.fakes.openai_server import FakeOpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the fake takes per completion")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = "sk-bench-0000000000000000000000000000"
    examples = [{"id": str(i), "question": f"Who wrote note {i}?", "context": "Ada Lovelace wrote the notes.",
                 "answers": ["Ada Lovelace"]} for i in range(args.requests)]
    with FakeOpenAI() as server:
        server.chat_responder = lambda body: "Ada Lovelace"
        server.inject(r"/v1/chat/completions", status=None, times=None, delay_s=args.delay)
        results = {}
        for concurrency in (1, args.concurrency):
            config = load_config(None, {"provider": "openai", "openai.base_url": server.base_url,
                                        "max_concurrency": str(concurrency)})
            provider = get_provider("openai", config)
            run = run_predictions(lambda q, c: provider.predict("ft:gpt-4o-mini:bench", q, c), examples,
                                  concurrency)
            metrics = summarize(run, bootstrap_samples=100, seed=0)
            assert metrics["eval_exact_match"] == 100.0 and metrics["eval_error_count"] == 0
            results[concurrency] = run.wall_seconds
            print(f"concurrency {concurrency:>2}: {args.requests} requests in {run.wall_seconds:.2f} s "
                  f"({metrics['eval_throughput_rps']:.1f} req/s, latency p50 {metrics['latency_ms_p50']:.1f} ms)")
    print(f"speed-up: {results[1] / results[args.concurrency]:.1f}x")


if __name__ == "__main__":
    main()

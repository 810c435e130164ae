"""Benchmark: `prepare` on synthetic SQuAD data of a chosen size (time, peak RSS), this checkout vs a reference.

The synthetic file replicates the shipped `data/squad/train.json` articles with new ids, titles and numbered
questions (so prepare keeps every row rather than dropping copies as duplicates) until it holds
the asked number of questions, in a temporary folder (nothing large is committed). Each size runs the
`finetune_mlflow prepare` entry point in a fresh process against one SQLite store per checkout. `--reference DIR` runs the
same command from another checkout (e.g. a `git worktree` of an older commit) side by side, for the ratio.
Usage (repository root): `python -m benchmarks.bench_prepare [--quick] [--sizes 100000 300000 1000000]
[--reps 2] [--reference /work/wt/perf-base]`. A million questions take about 450 MB of input and, per run,
about 4 GB of prepared files (in the temp folder and the store's artifacts), removed after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "squad" / "train.json"


def synthetic_articles(n_questions: int) -> Iterator[dict]:
    """The shipped articles again and again until they hold `n_questions` questions: new ids and titles, and
    each copy's questions numbered, so no row is a duplicate that prepare drops (a benchmark of mostly dropped
    rows would not write them)."""
    articles = json.loads(SHIPPED.read_text(encoding="utf-8"))["data"]
    count, copy = 0, 0
    while count < n_questions:
        for article in articles:
            paragraphs = []
            for paragraph in article["paragraphs"]:
                qas = [{**qa, "id": f"{qa['id']}-{copy}", "question": f"{qa['question']} ({copy})" if copy else
                        qa["question"]} for qa in paragraph["qas"][: n_questions - count]]
                count += len(qas)
                if qas:
                    paragraphs.append({"context": paragraph["context"], "qas": qas})
            if paragraphs:
                yield {"title": f"{article['title']} ({copy})", "paragraphs": paragraphs}
        copy += 1


def synthetic_squad(n_questions: int, path: Path) -> Path:
    """A one-line SQuAD v1.1 file of `n_questions` questions, written an article at a time (1M questions are
    about 450 MB)."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write('{"version": "1.1", "data": [')
        for number, article in enumerate(synthetic_articles(n_questions)):
            handle.write((", " if number else "") + json.dumps(article))
        handle.write("]}")
    return path


def run_prepare(checkout: Path, data: Path, store: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one `prepare` process run from `checkout` (CPU time moves
    less than wall time with the load of a shared machine)."""
    command = [sys.executable, "-c", "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
               "code = 0\ntry: runpy.run_module('finetune_mlflow', run_name='__main__')\n"
               "except SystemExit as e: code = e.code or 0\n"
               "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
               "print('maxrss_kb', usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr)\n"
               "sys.exit(code)", "finetune_mlflow", "prepare", "--train_data", str(data),
               "--max_examples", "0"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"prepare failed in {checkout}:\n{done.stderr[-2000:]}")
    _, rss, cpu = next(line for line in done.stderr.splitlines() if line.startswith("maxrss_kb")).split()
    return wall, float(cpu), int(rss) / 1024


def measure(checkout: Path, data: Path, reps: int, warm_up: Path) -> tuple[list[float], list[float], float]:
    """`reps` timed runs against one store, after an untimed warm-up run on a small file that creates it (a new
    SQLite store spends seconds creating its tables, which a user pays once, not per prepare)."""
    walls, cpus, peak = [], [], 0.0
    with tempfile.TemporaryDirectory() as store:
        run_prepare(checkout, warm_up, Path(store))
        for _ in range(reps):
            wall, cpu, rss = run_prepare(checkout, data, Path(store))
            walls.append(wall)
            cpus.append(cpu)
            peak = max(peak, rss)
    return walls, cpus, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--reference", type=Path, help="another checkout to run side by side")
    parser.add_argument("--quick", action="store_true", help="20,000 questions, one repetition")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps = [20_000], 1
    checkouts = {"this": SHIPPED.parent.parent.parent} | ({"reference": args.reference} if args.reference else {})
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as scratch:
        warm_up = synthetic_squad(1000, Path(scratch) / "warm-up.json")
        for size in args.sizes:
            data = synthetic_squad(size, Path(scratch) / f"squad-{size}.json")
            results = {name: measure(checkout, data, args.reps, warm_up) for name, checkout in checkouts.items()}
            data.unlink()  # a million questions are about 450 MB
            for name, (walls, cpus, rss) in results.items():
                print(f"{size:>8} questions, {name:>9}: {statistics.median(walls):6.1f} s "
                      f"(range {min(walls):.1f}-{max(walls):.1f}), CPU {statistics.median(cpus):.1f} s, "
                      f"peak RSS {rss:.0f} MB, load {os.getloadavg()[0]:.1f}", flush=True)
            if "reference" in results:
                ratios = [statistics.median(results["reference"][i]) / statistics.median(results["this"][i])
                          for i in (0, 1)]
                print(f"{size:>8} questions: this checkout is {ratios[0]:.1f}x the reference's speed "
                      f"({ratios[1]:.1f}x in CPU time)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""Peak memory of answering one question about a long context, per MB of context: the work a served local
version does for one request row (`QAModel.predict` -> the local provider's `predict`).

For this checkout and a reference commit (default f5f9904, before windowed answering), each size runs in a fresh
subprocess: the context is built, RSS is read, one prediction is made, and the process's peak RSS (ru_maxrss)
minus the RSS before it is the request's cost. Repetitions give median (min-max).

    python -m benchmarks.bench_served_memory --quick            # this checkout, 0.25 MB, once
    python -m benchmarks.bench_served_memory --sizes 0.25 0.5 1 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_local_model import export_tree

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "f5f9904"
CHILD = r"""
import json, random, resource, sys, time
from finetune_mlflow.config import load_config
from finetune_mlflow.providers import get_provider
size_mb = float(sys.argv[1])
words = ("the river Rhine flows through Basel and in 1257 merchants from the north built walls . The city was "
         "founded by Rollo , who signed the treaty with King Charles").split()
rng, parts, n = random.Random(0), [], 0
while n < size_mb * 1e6:
    word = rng.choice(words)
    parts.append(word)
    n += len(word) + 1
context = " ".join(parts)
provider = get_provider("local", load_config(None))
provider.predict("span-ranker-base", "Who?", "Ada wrote.")  # weights loaded, imports done
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
before, started = rss(), time.monotonic()
answer = provider.predict("span-ranker-base", "Who signed the treaty?", context).text
print(json.dumps({"before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
                  "seconds": time.monotonic() - started, "answer": answer[:40]}))
"""


def measure(tree: Path, size_mb: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "FINETUNE_MLFLOW_HOME": tempfile.mkdtemp()}
    out = subprocess.run([sys.executable, "-c", CHILD, str(size_mb)], env=env, check=True, capture_output=True,
                         text=True, cwd=tree).stdout
    return json.loads(out.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="context sizes in MB")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--reference", default=REFERENCE, help="commit to compare against ('' for none)")
    parser.add_argument("--quick", action="store_true", help="this checkout, 0.25 MB, once")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps, args.reference = [0.25], 1, ""
    print(f"load {os.getloadavg()[0]:.1f}", flush=True)
    trees = {"this checkout": REPO}
    if args.reference:
        trees[args.reference] = export_tree(args.reference, Path(tempfile.mkdtemp()) / "reference")
    for size in args.sizes:
        for label, tree in trees.items():
            runs = [measure(tree, size) for _ in range(args.reps)]
            per_mb = [(r["peak_mb"] - r["before_mb"]) / size for r in runs]
            print(f"{size:g} MB context, {label}: peak +{summary([r['peak_mb'] - r['before_mb'] for r in runs])} MB"
                  f" = {summary(per_mb)} MB per MB; {summary([r['seconds'] for r in runs])} s; answer "
                  f"{runs[0]['answer']!r}", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

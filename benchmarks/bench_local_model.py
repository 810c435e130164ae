"""Benchmark the local span ranker: F1/EM against training size, trainer time and peak memory, featurization.

Every figure is measured for this checkout AND for a reference commit (default 658c839, the model before the
question-head and focus features) in the same run, each in fresh subprocesses, on the same prepared shipped data:

    python benchmarks/bench_local_model.py --quick        # this checkout only, once: 49 s on 2 cores (load 3)
    python benchmarks/bench_local_model.py                 # both trees, 3 repetitions, 87k-question scale test

Memory is the trainer process's peak RSS (ru_maxrss); "per 1,000 questions" is the slope between the smallest
and the largest training size. The scale test replicates the training rows (each copy with its own suffixed
contexts, so no passage is shared across copies) up to --scale-rows questions and trains one epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "658c839"


def export_tree(commit: str, dest: Path) -> Path:
    """The reference commit's package, extracted with `git archive` (no worktree needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "finetune_mlflow", "experiments"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def worker(tree: Path, *args: str) -> dict:
    """Run one measurement in a fresh interpreter that imports `tree`'s finetune_mlflow."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    out = subprocess.run([sys.executable, __file__, "--worker", *args], cwd=tree, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- worker side (tree)

def _first_module(*names: str):
    """The first of `names` the tree has: this checkout and the reference lay the package out differently."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names}")


TRAINER_MODULES = ("finetune_mlflow.providers.local.trainer", "finetune_mlflow.local_trainer")

def _prepare(out_dir: str) -> dict:
    from finetune_mlflow.config import load_config

    prepare = _first_module("finetune_mlflow.preparation", "finetune_mlflow.steps.prepare")
    config = load_config(str(REPO / "experiments" / "squad_local.yaml"), {
        "train_data": str(REPO / "data" / "squad" / "train.json"),
        "validation_data": str(REPO / "data" / "squad" / "validation.json")})
    if hasattr(prepare, "write_splits"):  # streaming prepare
        counts, _ = prepare.write_splits(config, Path(out_dir))
        return {"train": counts["n_train"], "validation": counts["n_val"]}
    train, validation, _, dropped = prepare.build_splits(config)
    prepare.write_prepared(Path(out_dir), train, validation, dropped)
    return {"train": len(train), "validation": len(validation)}


def _featurize(prepared: str, n: str, reps: str) -> dict:
    """Seconds per 1,000 questions for everything the trainer does before its first step (idf + features)."""
    from finetune_mlflow.records import read_jsonl

    local_trainer = _first_module(*TRAINER_MODULES)
    span_model = _first_module("finetune_mlflow.providers.local.span_model", "finetune_mlflow.span_model")

    rows = read_jsonl(Path(prepared) / "train.jsonl")[: int(n)]
    times, cpu = [], []
    for _ in range(int(reps)):
        started, started_cpu = time.perf_counter(), time.process_time()
        if hasattr(local_trainer, "featurize_rows"):  # this checkout: nothing cached across calls
            local_trainer.featurize_rows(rows, local_trainer.idf_of(rows), 8)
        else:  # the reference: its passages are lru_cached
            span_model.passage.cache_clear()
            idf = span_model.document_frequencies([r["context"] for r in rows], 8)
            local_trainer._usable(rows, idf, 8)
        times.append((time.perf_counter() - started) / len(rows) * 1000)
        cpu.append((time.process_time() - started_cpu) / len(rows) * 1000)
    return {"s_per_1000": times, "cpu_s_per_1000": cpu}


def _replicated(rows: list[dict], total: int) -> list[dict]:
    out = []
    copy = 0
    while len(out) < total:
        suffix = "" if copy == 0 else f" Copy {copy}."
        out += [{**r, "id": f"{r['id']}-{copy}", "context": r["context"] + suffix} for r in rows]
        copy += 1
    return out[:total]


def _train(prepared: str, n: str, epochs: str, evaluate: str) -> dict:
    """Train through the real detached-trainer entry point with the tree's own default experiment settings
    (epochs: as given); time it, read its peak RSS and CPU time, score the registered weights."""
    from finetune_mlflow.config import load_config
    from finetune_mlflow.records import read_jsonl, write_jsonl

    config = load_config(str(Path.cwd() / "experiments" / "squad_local.yaml"))

    job = Path(tempfile.mkdtemp(prefix="bench-job-"))
    rows = read_jsonl(Path(prepared) / "train.jsonl")
    rows = rows[: int(n)] if int(n) <= len(rows) else _replicated(rows, int(n))
    write_jsonl(job / "train.jsonl", rows)
    spec = {"job_id": "bench", "run_id": "bench", "train": str(job / "train.jsonl"),
            "validation": str(Path(prepared) / "validation.jsonl"), "epochs": int(epochs),
            "learning_rate": config.tune.learning_rate, "batch_size": config.tune.batch_size, "seed": 0,
            "max_span_tokens": config.local.max_span_tokens, "eval_every_steps": config.local.eval_every_steps,
            "validation_loss_examples": config.local.validation_loss_examples,
            "average_every_steps": getattr(config.local, "average_every_steps", 0)}
    (job / "spec.json").write_text(json.dumps(spec))
    (job / "status.json").write_text(json.dumps({"state": "pending"}))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", _first_module(*TRAINER_MODULES).__name__, str(job)], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    status = json.loads((job / "status.json").read_text())
    result = {"n": len(rows), "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "peak_rss_mb": usage.ru_maxrss / 1024, "metrics": status.get("metrics", {})}
    if evaluate == "1":
        result.update(_score(status["tuned_model"], Path(prepared) / "validation.jsonl"))
    shutil.rmtree(job)
    return result


def _score(model: str, validation: Path) -> dict:
    from finetune_mlflow.config import load_config
    from finetune_mlflow.records import read_jsonl
    from finetune_mlflow.squad_metrics import best_over_golds

    local = _first_module("finetune_mlflow.providers.local.provider", "finetune_mlflow.providers.local")
    if hasattr(local, "weights_file"):  # this checkout names models inside a jobs home: `<job>/weights.npz`
        path = Path(model)
        provider = local.LocalProvider(load_config(None, {"local.jobs_dir": str(path.parent.parent)}))
        model = f"{path.parent.name}/{path.name}"
    else:
        provider = local.LocalProvider(load_config(None))
    rows = read_jsonl(validation)
    scores = [best_over_golds(provider.predict(model, r["question"], r["context"]).text, r["answers"]) for r in rows]
    return {"em": 100 * sum(s[0] for s in scores) / len(scores), "f1": 100 * sum(s[1] for s in scores) / len(scores),
            "by_type": _by_type(rows, [s[1] for s in scores])}


def _by_type(rows: list[dict], f1: list[float]) -> dict[str, list[float]]:
    """Question type -> [questions, F1] (the model's own question typing)."""
    features = _first_module("finetune_mlflow.providers.local.span_features")
    out: dict[str, list[float]] = {}
    for row, score in zip(rows, f1):
        kind = features.QUESTION_TYPES[features.question_type(row["question"])]
        n, total = out.get(kind, [0, 0.0])
        out[kind] = [n + 1, total + 100 * score]
    return {kind: [n, total / n] for kind, (n, total) in sorted(out.items(), key=lambda item: -item[1][0])}


WORKERS = {"prepare": _prepare, "featurize": _featurize, "train": _train}


# ----------------------------------------------------------------------------------------- driver side

def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(min(values)) if min(values) == max(values) else \
        f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def measure(trees: dict[str, Path], prepared: Path, sizes: list[int], reps: int) -> dict[str, dict]:
    """Per tree: one run per smaller size, then `reps` runs of the full size and of featurization, the trees
    interleaved rep by rep so that load from elsewhere on the machine hits both alike."""
    out = {label: {"rows": {}, "full": [], "featurize": []} for label in trees}
    for n in sizes[:-1]:
        for label, tree in trees.items():
            out[label]["rows"][n] = [worker(tree, "train", str(prepared), str(n), "3", "1")]
    for _ in range(reps):
        for label, tree in trees.items():
            out[label]["full"].append(worker(tree, "train", str(prepared), str(sizes[-1]), "3", "1"))
            out[label]["featurize"].append(worker(tree, "featurize", str(prepared), "100000", "1"))
    for result in out.values():
        result["rows"][sizes[-1]] = result["full"]
    return out


def report(label: str, result: dict) -> None:
    runs_by_size = result["rows"]
    print(f"\n== {label}")
    print(f"{'train questions':>16} {'F1':>6} {'EM':>6} {'wall s':>12} {'CPU s':>12} {'peak RSS MB':>12}  "
          "best checkpoint")
    for n, runs in runs_by_size.items():
        best = {k: int(v) for k, v in runs[0]["metrics"].items() if k in ("best_epoch", "best_step")}
        print(f"{runs[0]['n']:>16} {runs[0]['f1']:>6.1f} {runs[0]['em']:>6.1f} "
              f"{_range([r['seconds'] for r in runs], '{:.1f}'):>12} "
              f"{_range([r['cpu_seconds'] for r in runs], '{:.1f}'):>12} "
              f"{_range([r['peak_rss_mb'] for r in runs], '{:.0f}'):>12}  {best or 'last epoch'}")
    small, full = next(iter(runs_by_size.values()))[0], runs_by_size[max(runs_by_size)]
    print("validation F1 by question type (full size): " + ", ".join(
        f"{kind} ({int(n)}) {f1:.1f}" for kind, (n, f1) in full[0]["by_type"].items()))
    per_1000 = (min(r["peak_rss_mb"] for r in full) - small["peak_rss_mb"]) / (full[0]["n"] - small["n"]) * 1000
    print(f"trainer memory: {per_1000:.1f} MB per 1,000 training questions "
          f"(peak RSS slope {small['n']}->{full[0]['n']})")
    wall = [x for r in result["featurize"] for x in r["s_per_1000"]]
    cpu = [x for r in result["featurize"] for x in r["cpu_s_per_1000"]]
    print(f"featurization (idf + features): {_range(wall, '{:.3f}')} s wall, {_range(cpu, '{:.3f}')} s CPU "
          f"per 1,000 questions ({len(wall)} repetitions)")
    result["mb_per_1000"], result["featurize_cpu"] = per_1000, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="this checkout only, one repetition, no scale test")
    parser.add_argument("--reference", default=REFERENCE, help="commit to compare with")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale-rows", type=int, default=87_599, help="0: skip the synthetic scale test")
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](*args.worker[1:])))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    prepared = work / "prepared"
    n_train = worker(REPO, "prepare", str(prepared))["train"]
    sizes = [1000, 2000, 4000, n_train]
    print(f"machine: {os.cpu_count()} CPUs, {os.uname().machine}, python {sys.version.split()[0]}; "
          f"load average {os.getloadavg()[0]:.2f}")
    trees = {"this checkout": REPO}
    if not args.quick:
        trees[f"reference {args.reference}"] = export_tree(args.reference, work / "reference")
    results = measure(trees, prepared, sizes, 1 if args.quick else args.reps)
    for label, result in results.items():
        report(label, result)
    if len(results) == 2:
        mine, ref = results.values()
        print(f"\nratios (reference / this checkout): memory per 1,000 questions "
              f"{ref['mb_per_1000'] / mine['mb_per_1000']:.1f}x, featurization CPU "
              f"{min(ref['featurize_cpu']) / min(mine['featurize_cpu']):.1f}x (best of each)")
    if args.scale_rows and not args.quick:
        big = worker(REPO, "train", str(prepared), str(args.scale_rows), "1", "0")
        print(f"\nscale test (this checkout): {big['n']} questions (training rows replicated, contexts suffixed), "
              f"1 epoch: {big['seconds']:.0f} s wall, {big['cpu_seconds']:.0f} s CPU, "
              f"peak RSS {big['peak_rss_mb']:.0f} MB")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

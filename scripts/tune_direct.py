"""Tune and score with the transformers provider directly, no MLflow: for a machine that has torch but not this
project's tracking stack (the GPU check in scripts/gpu_check.sh). Prints one JSON object of numbers.

    python scripts/tune_direct.py --prepared DIR --base-model FILE_OR_ID [--config experiments/squad_smollm2.yaml]
        [--set transformers.device=cuda ...]

DIR holds what `prepare` writes (validation.jsonl plus openai/{train,validation}.jsonl). Both models answer the
same validation questions with batched greedy generation; the F1 gain carries a paired-bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from finetune_mlflow.config import load_config
from finetune_mlflow.providers import get_provider
from finetune_mlflow.providers.base import TERMINAL_STATES, TuningRequest
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.squad_metrics import best_over_golds
from finetune_mlflow.stats import bootstrap_interval, paired_bootstrap_delta


def score(provider, model: str, examples: list[dict]) -> tuple[list[float], float]:
    """Per-example F1 (0-100) and the wall seconds the batched generation took."""
    started = time.monotonic()
    predictions = provider.predict_batch(model, [(e["question"], e["context"]) for e in examples])
    seconds = time.monotonic() - started
    return [100.0 * best_over_golds(p.text, e["answers"])[1] for p, e in zip(predictions, examples)], seconds


def tune(provider, config, prepared: Path) -> tuple[object, float]:
    request = TuningRequest(run_id=f"direct-{time.time_ns()}", base_model=config.tune.base_model,
                            prepared_dir=prepared, epochs=config.tune.epochs,
                            learning_rate=config.tune.learning_rate, batch_size=config.tune.batch_size,
                            seed=config.tune.seed, suffix="direct")
    started = time.monotonic()
    provider.preflight(request)
    job = provider.start_job(request)
    while (job := provider.get_job(job.job_id)).state not in TERMINAL_STATES:
        time.sleep(1.0)
    if job.tuned_model is None:
        raise SystemExit(f"job {job.job_id} {job.state.value}: {job.error_code} {job.error_message}")
    return job, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--config", default="experiments/squad_smollm2.yaml")
    parser.add_argument("--set", action="append", default=[], help="section.key=value override")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    config = load_config(args.config, {**overrides, "base_model": args.base_model})
    provider = get_provider("transformers", config)
    examples = read_jsonl(args.prepared / "validation.jsonl")
    base_f1, base_s = score(provider, config.tune.base_model, examples)
    job, tune_s = tune(provider, config, args.prepared)
    tuned_f1, tuned_s = score(provider, job.tuned_model, examples)
    delta = paired_bootstrap_delta(tuned_f1, base_f1, samples=config.evaluate.bootstrap_samples, seed=0)
    print(json.dumps({
        "n_validation": len(examples), "base_f1": bootstrap_interval(base_f1).estimate,
        "tuned_f1": bootstrap_interval(tuned_f1).estimate, "f1_delta": delta.estimate,
        "f1_delta_ci95": [delta.low, delta.high], "tune_wall_s": tune_s, "base_eval_s": base_s,
        "tuned_eval_s": tuned_s, "job_metrics": job.metrics, "checkpoints": job.tags.get("transformers.checkpoints"),
    }, indent=1))


if __name__ == "__main__":
    main()

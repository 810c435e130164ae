"""The local provider's background job: `python -m finetune_mlflow.providers.local.trainer <job_dir>`.

Reads `spec.json`, trains the span ranker, appends one JSON line per metric point to `events.jsonl`, saves
`weights.npz`, and keeps `status.json` current. Runs detached from `tune`, like a cloud job, so killing `tune`
does not kill training.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from finetune_mlflow.providers.local import span_model
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.providers.job_dir import run_trainer, write_json_atomic
from finetune_mlflow.providers.local.provider import WEIGHTS_FILE, save_weights


def _usable(rows: list[dict], idf: dict[str, float], max_span_tokens: int, limit: int = 0) -> tuple[list, int]:
    """(features, gold span ids) of examples whose answer is a candidate span, at most `limit` of them (0: all),
    and how many examples were skipped before that."""
    usable, skipped = [], 0
    for row in rows:
        if limit and len(usable) == limit:
            break
        f = span_model.features(row["question"], row["context"], idf, max_span_tokens)
        gold = span_model.gold_spans(f, row["answers"])
        if len(gold):
            usable.append((f, gold))
        else:
            skipped += 1
    return usable, skipped


def run(job_dir: Path) -> None:
    spec = json.loads((job_dir / "spec.json").read_text(encoding="utf-8"))
    status = {"state": "running", "updated": time.time()}
    write_json_atomic(job_dir / "status.json", status)
    size = spec["max_span_tokens"]
    train_rows = read_jsonl(spec["train"])
    idf = span_model.document_frequencies([row["context"] for row in train_rows], size)
    train, skipped_train = _usable(train_rows, idf, size)
    # Only the first examples feed val_loss: featurizing the rest would be wasted work.
    validation, _ = _usable(read_jsonl(spec["validation"]), idf, size, limit=spec["validation_loss_examples"])
    if not train:
        raise ValueError("no training example has its answer inside a candidate span")
    steps = span_model.train(
        train, validation, span_model.initial_weights(size), epochs=spec["epochs"],
        learning_rate=spec["learning_rate"], batch_size=spec["batch_size"], seed=spec["seed"],
        eval_every_steps=spec["eval_every_steps"],
    )
    weights = None
    with open(job_dir / "events.jsonl", "a", encoding="utf-8") as events:
        for report, weights in steps:
            now = int(time.time() * 1000)
            lines = [{"key": "train_loss", "value": report.train_loss, "step": report.step, "ts": now}]
            if report.val_loss is not None:
                lines.append({"key": "val_loss", "value": report.val_loss, "step": report.step, "ts": now})
            events.write("".join(json.dumps(line) + "\n" for line in lines))
            events.flush()
    save_weights(job_dir / WEIGHTS_FILE, weights, idf, size)
    write_json_atomic(job_dir / "status.json", {
        "state": "succeeded", "updated": time.time(), "tuned_model": str(job_dir / WEIGHTS_FILE),
        "metrics": {"trained_examples": len(train), "skipped_unanswerable_examples": skipped_train,
                    "completed_step_count": report.step},
    })


def main(argv: list[str]) -> int:
    return run_trainer(Path(argv[1]), run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

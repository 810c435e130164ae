"""The local provider's background job: `python -m finetune_mlflow.providers.local.trainer <job_dir>`.

Reads `spec.json`, trains the span ranker, appends one JSON line per metric point to `events.jsonl`, saves
`weights.npz`, and keeps `status.json` current. Runs detached from `tune`, like a cloud job, so killing `tune`
does not kill training.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from finetune_mlflow.providers.local import span_model
from finetune_mlflow.records import read_jsonl
from finetune_mlflow.providers.local.provider import TRAINER_LOCK, TRAINER_PID, WEIGHTS_FILE, save_weights, write_json_atomic


class Diverged(Exception):
    """The loss stopped being a number: training is over, and no model is saved (error_code "diverged")."""


def _guarded(steps):
    """The training steps, with a loss that overflows inside the model (log of an underflowed probability: Python
    raises 'math domain error') reported as the divergence it is."""
    last = 0
    try:
        for report, weights in steps:
            last = report.step
            yield report, weights
    except (ValueError, FloatingPointError, OverflowError) as e:
        if isinstance(e, ValueError) and "math domain error" not in str(e):
            raise
        raise Diverged(f"the loss became infinite or not a number after step {last} ({e}); lower the "
                       "learning rate") from e


def _written_points(path: Path) -> set[tuple[str, int]]:
    """(key, step) of every complete event line already in the file (a half-written last line is cut off)."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    return {(event["key"], int(event["step"])) for event in map(json.loads, complete.splitlines())}


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
    # A restarted job (its trainer died) trains again from scratch with the same seed: points it already wrote
    # are not written twice.
    written = _written_points(job_dir / "events.jsonl")
    with open(job_dir / "events.jsonl", "a", encoding="utf-8") as events:
        for report, weights in _guarded(steps):
            now = int(time.time() * 1000)
            lines = [{"key": "train_loss", "value": report.train_loss, "step": report.step, "ts": now}]
            if report.val_loss is not None:
                lines.append({"key": "val_loss", "value": report.val_loss, "step": report.step, "ts": now})
            events.write("".join(json.dumps(line) + "\n" for line in lines
                                 if (line["key"], line["step"]) not in written))
            events.flush()
            if not all(math.isfinite(line["value"]) for line in lines):
                shown = ", ".join(f"{line['key']} {line['value']}" for line in lines)
                raise Diverged(f"{shown} at step {report.step}: "
                               "the loss is no longer a number; lower the learning rate")
    save_weights(job_dir / WEIGHTS_FILE, weights, idf, size)
    write_json_atomic(job_dir / "status.json", {
        "state": "succeeded", "updated": time.time(), "tuned_model": str(job_dir / WEIGHTS_FILE),
        "metrics": {"trained_examples": len(train), "skipped_unanswerable_examples": skipped_train,
                    "completed_step_count": report.step},
    })


def main(argv: list[str]) -> int:
    job_dir = Path(argv[1])
    lock = open(job_dir / TRAINER_LOCK, "a")  # held until this process exits, however it exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another trainer holds this job; exiting", file=sys.stderr)
        return 0
    if json.loads((job_dir / "status.json").read_text(encoding="utf-8"))["state"] in ("succeeded", "failed",
                                                                                 "cancelled"):
        return 0
    write_json_atomic(job_dir / TRAINER_PID, {"pid": os.getpid()})
    try:
        run(job_dir)
    except Exception as e:  # noqa: BLE001 - every failure must end as a readable job status
        traceback.print_exc()
        write_json_atomic(job_dir / "status.json", {
            "state": "failed", "updated": time.time(),
            "error_code": "diverged" if isinstance(e, Diverged) else type(e).__name__, "error_message": str(e),
        })
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

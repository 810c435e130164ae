"""The trainer's window onto its job directory: loss events at real steps, progress, and epoch checkpoints.

A trainer restarted from a checkpoint replays the steps after it; their events were already written, so events
are only appended for steps past the last one recorded under each key (a reader never sees a step twice).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from finetune_mlflow.providers.job_dir import write_json_atomic

EVENTS = "events.jsonl"
CHECKPOINTS = "checkpoints.json"
# Hugging Face's log key -> the project's shared metric key.
LOSS_KEYS = {"loss": "train_loss", "eval_loss": "val_loss"}


def last_steps(path: Path) -> dict[str, int]:
    """Highest step already recorded per key (complete lines only)."""
    steps: dict[str, int] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                event = json.loads(line)
                steps[event["key"]] = max(steps.get(event["key"], -1), int(event["step"]))
    return steps


def read_checkpoints(job_dir: Path) -> list[dict]:
    path = job_dir / CHECKPOINTS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def checkpoint_entry(folder: Path, epoch: int, step: int, log_history: list[dict]) -> dict:
    losses = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    return {"checkpoint_id": f"epoch-{epoch}", "epoch": epoch, "step": step, "path": str(folder),
            "val_loss": losses[-1] if losses else None}


def recovered_checkpoints(output_dir: Path, listed: list[dict]) -> list[dict]:
    """`listed` plus the epoch-end checkpoints Hugging Face finished writing but a killed trainer never listed (it
    died between the save and the callback after it): a resumed job would otherwise skip that epoch's candidate."""
    known = {entry["epoch"] for entry in listed}
    found = list(listed)
    for state_file in sorted(output_dir.glob("checkpoint-*/trainer_state.json")):
        state = json.loads(state_file.read_text(encoding="utf-8"))
        epoch = float(state.get("epoch") or 0)
        if epoch >= 1 and abs(epoch - round(epoch)) < 1e-6 and round(epoch) not in known:
            known.add(round(epoch))
            found.append(checkpoint_entry(state_file.parent, round(epoch), int(state["global_step"]),
                                          state.get("log_history", [])))
    return sorted(found, key=lambda entry: entry["step"])


class JobEvents(TrainerCallback):
    def __init__(self, job_dir: Path, save_steps: int, on_progress: Callable[[dict], None]):
        self.job_dir = job_dir
        self.save_steps = save_steps
        self.on_progress = on_progress
        self.recorded = last_steps(job_dir / EVENTS)
        self.checkpoints = read_checkpoints(job_dir)
        self.epoch_ended = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.checkpoints = recovered_checkpoints(Path(args.output_dir), self.checkpoints)
            write_json_atomic(self.job_dir / CHECKPOINTS, self.checkpoints)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:  # data-parallel workers: rank 0 speaks for all
            return
        now = int(time.time() * 1000)
        lines = []
        for hf_key, key in LOSS_KEYS.items():
            if logs and hf_key in logs and state.global_step > self.recorded.get(key, -1):
                lines.append({"key": key, "value": float(logs[hf_key]), "step": state.global_step, "ts": now})
                self.recorded[key] = state.global_step
        if lines:
            with open(self.job_dir / EVENTS, "a", encoding="utf-8") as events:
                events.write("".join(json.dumps(line) + "\n" for line in lines))
                events.flush()
                os.fsync(events.fileno())
        self.on_progress({"completed_step_count": state.global_step, "total_steps": state.max_steps})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.save_steps and state.global_step % self.save_steps == 0:
            control.should_save = True

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        control.should_evaluate = True
        control.should_save = True
        self.epoch_ended = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Each epoch's adapter is a checkpoint candidate; the trainer saved it just before this call."""
        if not self.epoch_ended or not state.is_world_process_zero:
            return
        self.epoch_ended = False
        epoch = int(round(state.epoch))
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.checkpoints = [c for c in self.checkpoints if c["epoch"] != epoch] + [
            checkpoint_entry(folder, epoch, state.global_step, state.log_history)]
        write_json_atomic(self.job_dir / CHECKPOINTS, self.checkpoints)
        self.on_progress({"completed_step_count": state.global_step, "total_steps": state.max_steps})

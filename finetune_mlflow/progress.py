"""One line per poll that brought news, for the terminal: state, step/total, epoch, latest losses, elapsed, ETA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from finetune_mlflow.providers.base import MetricPoint, TuningJob


@dataclass
class Progress:
    started: float
    step: int = 0
    latest: dict[str, float] = field(default_factory=dict)
    # (time, step) when this process first saw a step: the ETA is measured from there (a reattach starts late).
    first_seen: tuple[float, int] | None = None

    def update(self, points: Iterable[MetricPoint], now: float) -> None:
        for point in points:
            self.step = max(self.step, point.step)
            self.latest[point.key] = point.value
        if self.first_seen is None and self.step:
            self.first_seen = (now, self.step)

    def eta(self, total: int | None, now: float) -> float | None:
        if not total or self.first_seen is None or self.step >= total or self.step <= self.first_seen[1]:
            return None
        seconds, steps = now - self.first_seen[0], self.step - self.first_seen[1]
        return seconds / steps * (total - self.step)

    def line(self, job: TuningJob, now: float) -> str:
        """`running step 120/810 (epoch 1.4) train_loss 1.92 val_loss 2.05, 12s elapsed, ETA 70s`."""
        elapsed = now - self.started
        parts = [job.provider_status]
        step = max(self.step, int(job.metrics.get("completed_step_count", 0)))
        if step:
            total = job.total_steps
            parts.append(f"step {step}/{total}" if total else f"step {step}")
            epochs = job.hyperparameters.get("epochs")
            if total and epochs and epochs.isdigit():
                parts.append(f"(epoch {step * int(epochs) / total:.1f}/{epochs})")
        for key in ("train_loss", "val_loss"):
            if key in self.latest:
                parts.append(f"{key} {self.latest[key]:.3f}")
        eta = self.eta(job.total_steps, now)
        return " ".join(parts) + f", {elapsed:.0f}s elapsed" + (f", ETA {eta:.0f}s" if eta is not None else "")

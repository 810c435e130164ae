"""Every checkpoint of a job is a candidate: after the final model is evaluated, the checkpoints chosen by
`evaluate.checkpoints` are scored on the same validation questions and the evidence picks the model to register.

Choice: `all`, `last`, `best_val_loss` (the lowest validation loss the checkpoint reports, else the run's `val_loss`
curve nearest its step), `auto` = all when there are at most 4, else best_val_loss and last. A checkpoint that
is the final model itself (the same model id) is not evaluated twice; one the provider knows to be the same model
(`same_model`: the local trainer keeps its best epoch as `weights.npz`) is scored from the final model's rows. A
checkpoint displaces the final model only when the 95% lower bound of its paired-bootstrap F1 gain over the final
model is above 0: ties and noise keep the final. Logged in the run: `checkpoint_eval_f1`,
`checkpoint_eval_exact_match`, `checkpoint_latency_ms_p95` at step = the checkpoint's training step (a chart of F1
against step beside the loss curves), the table `checkpoints.json` (one row per evaluated model, the final
included), `selected_eval_f1`/`_exact_match`/`selected_latency_ms_p95`, and the tag `finetune.checkpoint_selection`
(JSON of the choice; a rerun reuses it instead of paying again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mlflow.tracking import MlflowClient

from finetune_mlflow.config import Config
from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.evaluation import EvaluationRun, ExampleResult, delta_against, error_rate, summarize
from finetune_mlflow.providers.base import Checkpoint, MetricPoint, Provider, TuningJob
from finetune_mlflow.scoring import log_results_table, score_model
from finetune_mlflow.tracking import MetricSink, log_values

logger = logging.getLogger(__name__)

SELECTION_TAG = "finetune.checkpoint_selection"
TABLE = "checkpoints.json"
AUTO_ALL_MAX = 4
STEP_METRICS = {"checkpoint_eval_f1": "eval_f1", "checkpoint_eval_exact_match": "eval_exact_match",
                "checkpoint_latency_ms_p95": "latency_ms_p95"}
HEADLINE = ("eval_f1", "eval_exact_match", "latency_ms_p95")
# Columns of `checkpoints.json` besides the headline: how many questions, how fast (none for a reused evaluation).
VOLUME = ("eval_n", "eval_throughput_rps")


@dataclass(frozen=True)
class Candidate:
    """An evaluated checkpoint: its summary (with `eval_f1_delta*` against the final model) and its rows."""

    checkpoint: Checkpoint
    metrics: dict[str, float]
    rows: list[ExampleResult]
    error: str | None = None


@dataclass(frozen=True)
class Selection:
    """The model to register: a checkpoint, or the final model (`checkpoint` None), with its headline metrics."""

    model: str
    checkpoint: Checkpoint | None
    metrics: dict[str, float]


# ------------------------------------------------------------------------------------------------ pure choices


def val_loss_at(checkpoint: Checkpoint, curve: Mapping[int, float]) -> float | None:
    """The checkpoint's own validation loss (full set first), else the run's curve at the step nearest its own
    (the earlier one on a tie)."""
    for key in ("full_valid_loss", "val_loss"):
        if key in checkpoint.metrics:
            return float(checkpoint.metrics[key])
    nearest = min(curve, key=lambda step: (abs(step - checkpoint.step), step), default=None)
    return None if nearest is None else float(curve[nearest])


def select(checkpoints: Sequence[Checkpoint], choice: str, final_model: str | None,
           curve: Mapping[int, float]) -> list[Checkpoint]:
    """The checkpoints to evaluate, in step order, the final model itself left out."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if choice == "auto":
        choice = "all" if len(ordered) <= AUTO_ALL_MAX else "best_val_loss+last"
    wanted: list[Checkpoint] = list(ordered) if choice == "all" else []
    parts = choice.split("+")
    if "last" in parts and ordered:
        wanted.append(ordered[-1])
    if "best_val_loss" in parts:
        scored = [(val_loss_at(c, curve), c) for c in ordered]
        scored = [(loss, c) for loss, c in scored if loss is not None]
        if scored:
            wanted.append(min(scored, key=lambda item: (item[0], item[1].step))[1])  # a tie: less training
        else:
            logger.warning("no checkpoint reports a validation loss: best_val_loss picks none")
    unique = {c.checkpoint_id: c for c in wanted if c.model != final_model}
    return sorted(unique.values(), key=lambda c: c.step)


def choose(candidates: Sequence[Candidate]) -> Candidate | None:
    """The best checkpoint whose F1 gain over the final model has a 95% lower bound above 0, else None."""
    better = [c for c in candidates if c.error is None and c.metrics.get("eval_f1_delta_ci_low", -math.inf) > 0]
    return max(better, key=lambda c: (c.metrics["eval_f1"], c.metrics["eval_f1_delta_ci_low"], c.checkpoint.step),
               default=None)


def table_rows(final_model: str, final_metrics: Mapping[str, float], candidates: Sequence[Candidate],
               chosen: Candidate | None, curve: Mapping[int, float]) -> dict[str, list[Any]]:
    """Column-oriented `checkpoints.json`: the final model first, then each evaluated checkpoint by step."""
    rows = [{"checkpoint_id": "final", "step": None, "epoch": None, "model": final_model, "val_loss": None,
             **{key: final_metrics.get(key) for key in HEADLINE + VOLUME}, "eval_f1_delta": 0.0,
             "eval_f1_delta_ci_low": None, "eval_f1_delta_ci_high": None, "error": None, "selected": chosen is None}]
    for c in candidates:
        rows.append({"checkpoint_id": c.checkpoint.checkpoint_id, "step": c.checkpoint.step,
                     "epoch": c.checkpoint.epoch, "model": c.checkpoint.model,
                     "val_loss": val_loss_at(c.checkpoint, curve),
                     **{key: c.metrics.get(key) for key in HEADLINE + VOLUME},
                     **{key: c.metrics.get(key) for key in ("eval_f1_delta", "eval_f1_delta_ci_low",
                                                            "eval_f1_delta_ci_high")},
                     "error": c.error, "selected": chosen is c})
    return {key: [row[key] for row in rows] for key in rows[0]}


def selection_of(final_model: str, final_metrics: Mapping[str, float], chosen: Candidate | None,
                 base_rows: Sequence[ExampleResult], config: Config) -> Selection:
    """The registered model's headline metrics; a checkpoint's gain over the base model is computed from rows."""
    if chosen is None:
        return Selection(final_model, None, {k: v for k, v in final_metrics.items()
                                             if k in HEADLINE or k.startswith("eval_f1_delta")})
    over_base = delta_against(chosen.rows, base_rows, bootstrap_samples=config.evaluate.bootstrap_samples,
                              seed=config.evaluate.bootstrap_seed)
    return Selection(chosen.checkpoint.model, chosen.checkpoint,
                     {**{k: chosen.metrics[k] for k in HEADLINE if k in chosen.metrics},
                      **{k: v for k, v in over_base.items() if k.startswith("eval_f1_delta")}})


def describe(selection: Selection) -> str:
    """What a run's description adds when a checkpoint displaced the final model."""
    checkpoint = selection.checkpoint
    if checkpoint is None:
        return ""
    return (f"; registered checkpoint {checkpoint.checkpoint_id} (step {checkpoint.step}, epoch "
            f"{checkpoint.epoch if checkpoint.epoch is not None else 'n/a'}): F1 {selection.metrics['eval_f1']:.1f}")


def selection_tags(selection: Selection) -> dict[str, str]:
    """Tags naming the checkpoint a registered version serves (none when it is the final model)."""
    checkpoint = selection.checkpoint
    if checkpoint is None:
        return {}
    return {"finetune.checkpoint_id": checkpoint.checkpoint_id, "finetune.checkpoint_step": str(checkpoint.step),
            "finetune.checkpoint_epoch": "" if checkpoint.epoch is None else str(checkpoint.epoch)}


# ------------------------------------------------------------------------------------------------ MLflow shell


def previous_selection(client: MlflowClient, run_id: str) -> Selection | None:
    """The choice an earlier attempt of this run already made and paid for, if any."""
    raw = client.get_run(run_id).data.tags.get(SELECTION_TAG)
    if not raw:
        return None
    saved = json.loads(raw)
    checkpoint = Checkpoint(**saved["checkpoint"]) if saved.get("checkpoint") else None
    return Selection(saved["model"], checkpoint, {k: float(v) for k, v in saved["metrics"].items()})


def _val_loss_curve(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}


def plan(provider: Provider, job: TuningJob, run_id: str, config: Config) -> list[Checkpoint]:
    """The checkpoints this run still has to evaluate (none once a selection is recorded)."""
    client = MlflowClient()
    if previous_selection(client, run_id) is not None:
        return []
    try:
        found = provider.checkpoints(job.job_id) if hasattr(provider, "checkpoints") else []
    except FinetuneError as e:  # the final model is still there to evaluate and register
        logger.warning("could not list the checkpoints of job %s (%s); evaluating the final model only",
                       job.job_id, e)
        found = []
    chosen = select(found, config.evaluate.checkpoints, job.tuned_model, _val_loss_curve(client, run_id))
    logger.info("job %s kept %d checkpoint(s); evaluating %d (%s)", job.job_id, len(found), len(chosen),
                config.evaluate.checkpoints)
    return chosen


def _score(provider: Provider, checkpoint: Checkpoint, examples: list[dict], config: Config,
           final_rows: list[ExampleResult], final_model: str | None) -> tuple[EvaluationRun, dict[str, float]]:
    """A checkpoint's evaluation against the final model's rows. One that is the final model byte for byte (the
    local trainer keeps its best epoch as `weights.npz`) is scored from those rows: the same answers, no requests."""
    if final_model and provider.same_model(checkpoint.model, final_model):
        run = EvaluationRun(list(final_rows), 0.0)
        bootstrap = {"bootstrap_samples": config.evaluate.bootstrap_samples, "seed": config.evaluate.bootstrap_seed}
        return run, {**summarize(run, **bootstrap), **delta_against(final_rows, final_rows, **bootstrap)}
    return score_model(provider, checkpoint.model, examples, config, final_rows)


def evaluate(provider: Provider, checkpoints: Sequence[Checkpoint], examples: list[dict], config: Config,
             final_rows: list[ExampleResult], final_model: str | None = None) -> list[Candidate]:
    """Score each checkpoint against the final model's rows; one over the error budget is kept as a failed row."""
    candidates = []
    for checkpoint in checkpoints:
        run, metrics = _score(provider, checkpoint, examples, config, final_rows, final_model)
        rate = error_rate(run.results)
        error = (f"{rate:.1%} of requests failed (over evaluate.max_error_rate)"
                 if rate > config.evaluate.max_error_rate else None)
        logger.info("checkpoint %s (step %d): F1 %.2f, gain over final %+.2f [%+.2f, %+.2f]%s",
                    checkpoint.checkpoint_id, checkpoint.step, metrics["eval_f1"],
                    metrics.get("eval_f1_delta", math.nan), metrics.get("eval_f1_delta_ci_low", math.nan),
                    metrics.get("eval_f1_delta_ci_high", math.nan), f"; {error}" if error else "")
        candidates.append(Candidate(checkpoint, metrics, run.results, error))
    return candidates


def log_candidates(run_id: str, job: TuningJob, final_metrics: Mapping[str, float], candidates: Sequence[Candidate],
                   chosen: Candidate | None) -> None:
    """Per-checkpoint step metrics (each step once) and the `checkpoints.json` table."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    MetricSink(client, run_id).log([MetricPoint(key, float(c.metrics[source]), c.checkpoint.step, now)
                                    for c in candidates for key, source in STEP_METRICS.items()
                                    if source in c.metrics])
    log_results_table(run_id, table_rows(job.tuned_model or "", final_metrics, candidates, chosen,
                                         _val_loss_curve(client, run_id)), artifact_file=TABLE)


def record(run_id: str, selection: Selection, metrics: Mapping[str, float]) -> None:
    """The choice, its headline metrics and `metrics` (the run's cost) in one write: a rerun that finds the tag
    has everything and pays for nothing again."""
    saved = {"model": selection.model, "metrics": selection.metrics,
             "checkpoint": dataclasses.asdict(selection.checkpoint) if selection.checkpoint else None}
    log_values(MlflowClient(), run_id, metrics={**{f"selected_{k}": v for k, v in selection.metrics.items()
                                                   if k in HEADLINE}, **metrics},
               tags={SELECTION_TAG: json.dumps(saved, sort_keys=True), "finetune.selected_model": selection.model,
                     **selection_tags(selection)})

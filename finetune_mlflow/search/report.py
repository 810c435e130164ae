"""What a search leaves on its sweep parent: the trials table (`search/trials.json`, pruned and failed trials
marked), Optuna's optimisation history and parameter importances (`search/history.png`, `search/importances.png`,
matplotlib backend), the distinguishability table and the recommendation (`search/report.md`), and the study's
summary as metrics and tags. Every worker writes it when it finishes; the last one leaves the complete picture."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from finetune_mlflow.search.choice import Choice, TrialOutcome, compare
from finetune_mlflow.search.trials import RUN_ATTR, counted, describe

logger = logging.getLogger(__name__)


def outcomes(study: Any, client: MlflowClient) -> list[TrialOutcome]:
    """Every trial that counts toward n_trials, with its run's scores (per question for completed ones)."""
    from finetune_mlflow.scoring import load_rows

    found = []
    for trial in counted(study.get_trials(deepcopy=False)):
        run_id = str(trial.user_attrs.get(RUN_ATTR, ""))
        run = client.get_run(run_id) if run_id else None
        metrics = dict(run.data.metrics) if run else {}
        rows = {}
        if trial.state.name == "COMPLETE" and run_id:
            rows = {row.id: row.f1 * 100 for row in load_rows(run_id)}  # F1 points, like eval_f1
        note = (run.data.tags.get("finetune.end_reason", "") if run else "") or str(trial.user_attrs.get("error", ""))
        found.append(TrialOutcome(trial.number, run_id, trial.state.name, dict(trial.params),
                                  trial.value if trial.state.name == "COMPLETE" else None,
                                  metrics.get("estimated_cost_usd"), metrics.get("latency_ms_p95"),
                                  _work(metrics, run.data.params if run else {}), rows,
                                  note if trial.state.name in ("PRUNED", "FAIL") else ""))
    return found


def _work(metrics: dict[str, float], params: dict[str, str]) -> float | None:
    """Training work, comparable across one study's trials: billed tokens where the provider reports them (epochs
    included), else steps completed x batch size (examples seen)."""
    if "trained_tokens" in metrics:
        return metrics["trained_tokens"]
    if "completed_step_count" not in metrics:
        return None
    batch = params.get("batch_size", "0")
    return metrics["completed_step_count"] * (int(batch) if batch.isdigit() and int(batch) > 0 else 1)


def markdown(study_name: str, found: list[TrialOutcome], choice: Choice | None, importances: dict[str, float]) -> str:
    """The search's page: every trial (pruned ones marked), the comparison to the winner, the recommendation."""
    lines = [f"# Search {study_name}", "",
             "| trial | state | point | F1 | p95 ms | cost USD | trained (tokens or examples) | run | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in sorted(found, key=lambda o: o.number):
        state = {"PRUNED": "**pruned**", "FAIL": "failed"}.get(o.state, o.state.lower())
        lines.append(f"| {o.number} | {state} | {describe(o.params)} | {_num(o.f1)} | {_num(o.latency_ms_p95, 1)} | "
                     f"{_num(o.cost_usd)} | {_num(o.trained, 0)} | `{o.run_id}` | {o.note.replace('|', '/')[:200]} |")
    if choice is not None:
        lines += ["", "## Distinguishable from the winner?", "",
                  (f"Winner by F1: trial {choice.winner.number} (F1 {choice.winner.f1:.2f}). Each other completed trial's "
                  "F1 difference to it, paired-bootstrap 95% interval over the same questions:"), "",
                  "| trial | F1 | F1 - winner [95% interval] | verdict |", "| --- | --- | --- | --- |"]
        for c in choice.compared:
            if c.delta is None:
                verdict = "winner" if c.outcome is choice.winner else "no shared questions"
                lines.append(f"| {c.outcome.number} | {c.outcome.f1:.2f} | | {verdict} |")
            else:
                verdict = "distinguishable" if c.distinguishable else "not distinguishable"
                lines.append(f"| {c.outcome.number} | {c.outcome.f1:.2f} | {c.delta.estimate:+.2f} "
                             f"[{c.delta.low:+.2f}, {c.delta.high:+.2f}] | {verdict} |")
        lines += ["", (f"**Recommended: trial {choice.recommended.number}** (run `{choice.recommended.run_id}`): "
                       f"{choice.reason}.")]
    if importances:
        lines += ["", "## Parameter importances (Optuna)", "", "| parameter | importance |", "| --- | --- |"]
        lines += [f"| {name} | {value:.3f} |" for name, value in importances.items()]
    lines += ["", "![optimisation history](history.png)"] + (["![importances](importances.png)"] if importances else [])
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _figures(client: MlflowClient, run_id: str, study: Any) -> dict[str, float]:
    """Optuna's history and importance plots on the parent; returns the importances ({} when they cannot be
    computed yet: fewer than two completed trials, or a parameter that never varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    importances: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        axes = plots.plot_optimization_history(study, target_name="eval_f1")
        axes.figure.tight_layout()
        client.log_figure(run_id, axes.figure, "search/history.png")
        plt.close(axes.figure)
        try:
            importances = optuna.importance.get_param_importances(study)
            axes = plots.plot_param_importances(study)
            axes.figure.tight_layout()  # dotted parameter names need the room
            client.log_figure(run_id, axes.figure, "search/importances.png")
            plt.close(axes.figure)
        except (RuntimeError, ValueError, ZeroDivisionError) as e:
            logger.info("no parameter importances yet: %s", e)
    return {k: float(v) for k, v in importances.items()}


def log_search_report(run_id: str, study: Any, *, samples: int, seed: int) -> tuple[list[TrialOutcome], Choice | None]:
    client = MlflowClient()
    found = outcomes(study, client)
    choice = compare(found, samples=samples, seed=seed)
    importances = _figures(client, run_id, study)
    table = {"trial": [o.number for o in found], "state": [o.state for o in found],
             "point": [describe(o.params) for o in found], "eval_f1": [o.f1 for o in found],
             "run_id": [o.run_id for o in found], "note": [o.note for o in found]}
    mlflow.log_table(table, "search/trials.json", run_id=run_id)
    client.log_text(run_id, markdown(study.study_name, found, choice, importances), "search/report.md")
    counts = {state: sum(o.state == state for o in found) for state in ("COMPLETE", "PRUNED", "FAIL")}
    retried = sum(1 for t in study.get_trials(deepcopy=False) if "failed_trial" in t.system_attrs)
    from finetune_mlflow.tracking import log_values

    metrics = {"search_n_trials": len(found), "search_n_complete": counts["COMPLETE"],
               "search_n_pruned": counts["PRUNED"], "search_n_failed": counts["FAIL"], "search_n_retried": retried,
               **{f"importance_{k.rsplit('.', 1)[-1]}": v for k, v in importances.items()}}
    tags = {}
    if choice is not None:
        metrics["best_eval_f1"] = choice.winner.f1
        tags = {"finetune.best_trial": str(choice.winner.number), "finetune.best_f1_run_id": choice.winner.run_id,
                "finetune.winner_run_id": choice.recommended.run_id,
                "finetune.recommended_trial": str(choice.recommended.number),
                "mlflow.note.content": f"search {study.study_name}: {counts['COMPLETE']} completed, "
                                       f"{counts['PRUNED']} pruned, {counts['FAIL']} failed; recommended trial "
                                       f"{choice.recommended.number}: {choice.reason}"}
    log_values(client, run_id, metrics=metrics, tags=tags)
    return found, choice

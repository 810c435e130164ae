"""Command line for every entry point: `finetune-mlflow <step> [--option value ...]` (also `python -m finetune_mlflow`).

MLproject calls these commands; `mlflow run -P name=value` appends `--name value`. The options are generated from
the config's knobs (`config.entry_flags`), so a new knob is one field. An empty option value means "keep the
config's value". Expected failures print one line (`error: ...`) and exit 2; the step's run is FAILED.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from typing import Callable

from finetune_mlflow.config import Config, entry_flags, knob_table, load_config
from finetune_mlflow.errors import ConfigError
from finetune_mlflow.process import run_guarded

DEFAULT_CONFIG = "experiments/squad_local.yaml"


def _config(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name) for name in entry_flags()}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = value
    config = load_config(args.config or None, overrides)
    from finetune_mlflow.store_check import check_tracking_store
    from finetune_mlflow.tracking import schema_lock, use_experiment

    with schema_lock():  # the store check's first call creates a fresh SQLite store's tables, one process at a time
        check_tracking_store()
    use_experiment(config.experiment)
    return config


def _prepare(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.prepare import run_prepare

    result = run_prepare(_config(args))
    print(f"prepared data in run {result.run_id} (data sha256 {result.data_sha256[:12]})")


def _tune(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.tune import run_tune
    from finetune_mlflow.summary import describe_tune

    result = run_tune(_config(args))
    print(f"run {result.run_id}: {describe_tune(result.metrics, result.job.job_id)}; registered "
          f"{result.version.model_uri}")


def _sync(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.sync import run_sync

    result = run_sync(_config(args), args.job_id)
    for job in result.jobs:
        outcome = job.registered_version or job.error or f"still {job.state.value}, nothing registered"
        print(f"{job.job_id}: {job.state.value} -> run {job.run_id} ({'new' if job.created_run else 'updated'}); "
              f"{outcome}")
    print(f"sync run {result.run_id}: {len(result.jobs)} job(s)")


def _evaluate(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.evaluate import run_evaluate
    from finetune_mlflow.summary import describe_evaluation

    result = run_evaluate(_config(args), args.model)
    scored = f"{args.model} (version {result.model_version.rpartition('/')[2]})" if result.model_version else args.model
    print(f"run {result.run_id}: {scored} {describe_evaluation(result.metrics)}")


def _promote(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.promote import run_promote, run_rollback

    config = _config(args)
    if _flag(args.rollback):
        run_rollback(config, args.model_name)
    else:
        run_promote(config, model_name=args.model_name, version=args.version, force=_flag(args.force),
                    reason=args.reason)


def _main(args: argparse.Namespace) -> None:
    from finetune_mlflow.pipeline import run_main

    run_main(_config(args))


def _sweep(args: argparse.Namespace) -> None:
    from finetune_mlflow.sweep import run_sweep

    result = run_sweep(_config(args), promote=_flag(args.promote), join=_flag(args.join))
    best = result.winner
    print(f"sweep run {result.run_id}: {len(result.points)} points, "
          f"{sum(p.status not in ('FINISHED', 'KILLED') for p in result.points)} failed; winner: "
          + (f"{best.config.run_name('tune')} (run {best.run_id}, F1 {best.metrics.get('eval_f1', float('nan')):.1f})"
             if best else "none"))


def _score(args: argparse.Namespace) -> None:
    from finetune_mlflow.scorefile import score_files

    score = score_files(args.dataset, args.predictions)
    if score.n_missing:
        print(f"warning: {score.n_missing} of {score.n_questions} questions have no prediction and score 0",
              file=sys.stderr)
    print(json.dumps({"exact_match": score.exact_match, "f1": score.f1}))


def _report(args: argparse.Namespace) -> None:
    from finetune_mlflow import report

    chosen = [name for name in ("experiment", "runs", "parent") if getattr(args, name)]
    if len(chosen) != 1:
        raise ConfigError("report needs exactly one of --experiment NAME, --runs ID,ID,... or --parent RUN_ID"
                            + (f" (got {', '.join('--' + name for name in chosen)})" if chosen else ""))
    if args.experiment:
        collected, source = report.from_experiment(args.experiment), f"experiment {args.experiment}"
    elif args.runs:
        collected, source = report.from_run_ids(args.runs.split(",")), "the given runs"
    else:
        collected, source = report.from_parent(args.parent), f"the children of run {args.parent}"
    built = report.build_report(collected.records, skipped=collected.skipped, source=source)
    markdown, page = report.write_report(built, args.out)
    winner = report.pick_winner(collected.records)
    skipped = sum(collected.skipped.values())
    print(f"{len(collected.records)} run(s) from {source}, {skipped} skipped; winner {winner.run_name} "
          f"({winner.run_id}) F1 {winner.metric('eval_f1'):.2f}; wrote {markdown} and {page}")


def _cancel(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.cancel import run_cancel

    job = run_cancel(_config(args), run_id=args.run_id, job_id=args.job_id)
    print(f"{job.job_id}: {job.provider_status}")


def _capture(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.capture import run_capture

    result = run_capture(_config(args), args.model, args.prompts)
    print(f"run {result.run_id}: {len(result.answers)} answers of {args.model} recorded"
          + (" (reused an earlier capture)" if result.reused else ""))


def _migrate(args: argparse.Namespace) -> None:
    from finetune_mlflow.migration import run_migrate

    run_migrate(_config(args))


def _lifecycle(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.lifecycle import run_lifecycle

    run_lifecycle(_config(args))


def _flag(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _knob_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (defaults < YAML < options)")
    sub.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config key")
    for name, (dotted, help_text) in entry_flags().items():
        sub.add_argument(f"--{name}", default="", help=f"{help_text} ({dotted})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-mlflow", description=__doc__.splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        # allow_abbrev=False: `--epoch 1` is an error, not a silent `--epochs 1`.
        sub = commands.add_parser(name, help=help_text, allow_abbrev=False)
        sub.set_defaults(handler=handler)
        _knob_options(sub)
        return sub

    command("prepare", _prepare, "clean, dedupe, split and convert the data")
    command("tune", _tune, "launch or reattach to a tuning job, evaluate and register it")
    evaluate = command("evaluate", _evaluate, "score a model reference on the validation split")
    evaluate.add_argument("--model", default="base",
                          help="base, models:/<name>/<version|@alias>, runs:/<id> or a provider model id (ft:...)")
    promote = command("promote", _promote, "move the champion alias when the evidence says so")
    for name, default in (("model_name", ""), ("version", ""), ("force", "false"), ("reason", ""),
                          ("rollback", "false")):
        promote.add_argument(f"--{name}", default=default)
    sync = command("sync", _sync, "import existing tuning jobs into runs, evaluate and register them")
    sync.add_argument("--job_id", default="", help="a job id or Vertex job name, or `all` for every listed job")
    cancel = command("cancel", _cancel, "stop a tuning job (local trainer or the provider's cancel call)")
    cancel.add_argument("--run_id", default="", help="the run that launched the job")
    cancel.add_argument("--job_id", default="", help="or the job id itself")
    command("lifecycle", _lifecycle, "refresh and list every registered version's shutdown date, soonest first")
    capture = command("capture", _capture, "record a model's answers on unlabelled prompts (question + context)")
    capture.add_argument("--model", default="", help="models:/<name>@<alias|version>, runs:/<id> or a model id")
    capture.add_argument("--prompts", default="", help="JSONL or CSV with question and context (optional id)")
    command("migrate", _migrate, "replace a retiring champion: tune the config's migration.candidates, keep the "
            "cheapest that is not worse")
    command("main", _main, "prepare -> evaluate base -> tune -> promote as child runs")
    sweep = command("sweep", _sweep, "one tune run per point of the config's sweep.grid, under a sweep parent")
    sweep.add_argument("--promote", default="false", help="hand the winner to promote (gates apply)")
    sweep.add_argument("--join", default="false", help="add this process as a worker to the running search of "
                       "the same experiment file (sweep.search: random | tpe)")
    report = commands.add_parser("report", allow_abbrev=False, help="compare tune runs: report.md and a self-contained report.html")
    report.add_argument("--experiment", default="", help="every tune run of this MLflow experiment")
    report.add_argument("--runs", default="", help="comma-separated run ids")
    report.add_argument("--parent", default="", help="the tune runs among this run's children (a sweep or main)")
    report.add_argument("--out", default="report", help="folder for report.md and report.html")
    report.set_defaults(handler=_report)
    knobs = commands.add_parser("knobs", help="every config key with its -P name, default, bounds and meaning",
                                allow_abbrev=False)
    knobs.set_defaults(handler=lambda args: print(knob_table(), end=""))
    score = commands.add_parser("score", help="SQuAD v1.1 EM/F1 of a predictions file, like evaluate-v1.1.py",
                                allow_abbrev=False)
    score.add_argument("dataset")
    score.add_argument("predictions")
    score.set_defaults(handler=_score)
    return parser


# Our downloads (prepared splits, result tables, models to score) are internal steps: MLflow's per-download
# progress bars would fill the log with bars nobody asked for. A user who sets the variable keeps their choice.
QUIET_DOWNLOADS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def main(argv: list[str] | None = None) -> int:
    for name, value in QUIET_DOWNLOADS.items():
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    if args.command not in ("score", "knobs", "report"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from finetune_mlflow.redaction import RedactingFilter

        for handler in logging.getLogger().handlers:
            handler.addFilter(RedactingFilter())
    return run_guarded(lambda: args.handler(args))


def run() -> int:
    """The program (`python -m finetune_mlflow`, `finetune-mlflow`): `main` in a process that ends right after.

    The objects MLflow, SQLAlchemy and pandas create live as long as the process, yet the default thresholds walk
    them in collection after collection (1.4-2.1 s per `evaluate` on 2 busy cores; 0.3-0.4 s with these, cycles
    still collected every 50,000 allocations), and the teardown walks them once more (over a second): frozen at
    the end, as nothing in a cycle needs finalizing then (files are closed by `with`, runs are ended)."""
    gc.set_threshold(50_000, 20, 20)
    code = main()
    gc.freeze()
    return code

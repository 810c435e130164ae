"""Command line for every entry point: `finetune-mlflow <step> [--option value ...]` (also `python -m finetune_mlflow`).

MLproject calls these commands; an empty option value means "keep the config's value", so MLproject can declare
every override with an empty default. Expected failures print one paragraph and exit 2; the step's run is FAILED.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from finetune_mlflow.config import FLAT_OVERRIDES, Config, load_config
from finetune_mlflow.errors import FinetuneError

DEFAULT_CONFIG = "experiments/squad_local.yaml"
DATA_OPTIONS = ("train_data", "validation_data", "max_examples", "on_invalid")
TUNE_OPTIONS = DATA_OPTIONS + ("provider", "base_model", "epochs", "learning_rate", "batch_size",
                               "registered_model_name", "poll_interval", "max_cost_usd", "max_concurrency")
SYNC_OPTIONS = ("provider", "registered_model_name", "train_data", "validation_data", "max_examples")


def _config(args: argparse.Namespace, names: tuple[str, ...]) -> Config:
    overrides = {name: getattr(args, name) for name in names}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = value
    return load_config(args.config or None, overrides)


def _prepare(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.prepare import run_prepare

    result = run_prepare(_config(args, DATA_OPTIONS))
    print(f"prepared data in run {result.run_id} (data sha256 {result.data_sha256[:12]})")


def _tune(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.tune import run_tune

    result = run_tune(_config(args, TUNE_OPTIONS))
    print(f"run {result.run_id}: job {result.job.job_id} -> eval_f1 {result.metrics['eval_f1']:.2f} "
          f"(base {result.metrics.get('base_eval_f1', float('nan')):.2f}), registered {result.version.model_uri}")


def _sync(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.sync import run_sync

    result = run_sync(_config(args, SYNC_OPTIONS), args.job_id)
    for job in result.jobs:
        outcome = job.registered_version or job.error or f"still {job.state.value}, nothing registered"
        print(f"{job.job_id}: {job.state.value} -> run {job.run_id} ({'new' if job.created_run else 'updated'}); "
              f"{outcome}")
    print(f"sync run {result.run_id}: {len(result.jobs)} job(s)")


def _evaluate(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.evaluate import run_evaluate

    result = run_evaluate(_config(args, TUNE_OPTIONS), args.model)
    m = result.metrics
    print(f"run {result.run_id}: {args.model} EM {m['eval_exact_match']:.2f} F1 {m['eval_f1']:.2f} "
          f"(95% CI {m['eval_f1_ci_low']:.2f}-{m['eval_f1_ci_high']:.2f}), n={m['eval_n']:.0f}, "
          f"errors={m['eval_error_count']:.0f}, latency p50 {m.get('latency_ms_p50', float('nan')):.2f} ms")


def _promote(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.promote import run_promote, run_rollback

    config = _config(args, ("registered_model_name",))
    if _flag(args.rollback):
        run_rollback(config, args.model_name)
    else:
        run_promote(config, model_name=args.model_name, version=args.version, force=_flag(args.force),
                    reason=args.reason)


def _main(args: argparse.Namespace) -> None:
    from finetune_mlflow.steps.main import run_main

    run_main(_config(args, TUNE_OPTIONS))


def _score(args: argparse.Namespace) -> None:
    from finetune_mlflow.squad_metrics import iter_squad_questions, score_predictions

    dataset = json.loads(Path(args.dataset).read_text(encoding="utf-8"))
    predictions = json.loads(Path(args.predictions).read_text(encoding="utf-8"))
    score = score_predictions(iter_squad_questions(dataset), predictions)
    if score.n_missing:
        print(f"warning: {score.n_missing} of {score.n_questions} questions have no prediction and score 0",
              file=sys.stderr)
    print(json.dumps({"exact_match": score.exact_match, "f1": score.f1}))


def _report(args: argparse.Namespace) -> None:
    from finetune_mlflow import report

    chosen = [name for name in ("experiment", "runs", "parent") if getattr(args, name)]
    if len(chosen) != 1:
        raise FinetuneError("report needs exactly one of --experiment NAME, --runs ID,ID,... or --parent RUN_ID"
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


def _flag(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-mlflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable, options: tuple[str, ...], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (defaults < YAML < options)")
        sub.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config key")
        for name_ in options:
            sub.add_argument(f"--{name_}", default="", help=f"overrides {FLAT_OVERRIDES[name_]}")
        return sub

    command("prepare", _prepare, DATA_OPTIONS, "clean, dedupe, split and convert the data")
    command("tune", _tune, TUNE_OPTIONS, "launch or reattach to a tuning job, evaluate and register it")
    evaluate = command("evaluate", _evaluate, TUNE_OPTIONS, "score a model reference on the validation split")
    evaluate.add_argument("--model", default="base",
                          help="base, models:/<name>/<version|@alias>, runs:/<id> or a provider model id (ft:...)")
    promote = command("promote", _promote, ("registered_model_name",),
                      "move the champion alias when the evidence says so")
    promote.add_argument("--model_name", default="")
    promote.add_argument("--version", default="")
    promote.add_argument("--force", default="false")
    promote.add_argument("--reason", default="")
    promote.add_argument("--rollback", default="false")
    sync = command("sync", _sync, SYNC_OPTIONS, "import existing tuning jobs into runs, evaluate and register them")
    sync.add_argument("--job_id", default="", help="a job id or Vertex job name, or `all` for every listed job")
    command("main", _main, TUNE_OPTIONS, "prepare -> evaluate base -> tune -> promote as child runs")
    report = commands.add_parser("report", help="compare tune runs: report.md and a self-contained report.html")
    report.add_argument("--experiment", default="", help="every tune run of this MLflow experiment")
    report.add_argument("--runs", default="", help="comma-separated run ids")
    report.add_argument("--parent", default="", help="the tune runs among this run's children (a sweep or main)")
    report.add_argument("--out", default="report", help="folder for report.md and report.html")
    report.set_defaults(handler=_report)
    score = commands.add_parser("score", help="SQuAD v1.1 EM/F1 of a predictions file, like evaluate-v1.1.py")
    score.add_argument("dataset")
    score.add_argument("predictions")
    score.set_defaults(handler=_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("score", "report"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.handler(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

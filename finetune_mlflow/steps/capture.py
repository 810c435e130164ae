"""capture: record a model's answers on a user's own unlabelled prompts, so it can be compared with after it shuts
down (agreement of a candidate with the recorded answers).

Parameters in: `config`, `model` (`models:/<name>/<version>`, `models:/<name>@<alias>`, `runs:/<id>` or a provider
model id) and `prompts` (JSONL or CSV with question and context, optional id). Logged on a `capture` run: the
prompts as an MLflow dataset input (context `capture`), the table `captured_answers.json` (id, question, context,
answer, latency_ms, error), metrics `capture_n`, `capture_error_count`, tags `finetune.captured_model`,
`finetune.prompts_sha256`. A finished capture of the same model and prompts is reused, never requested twice.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from finetune_mlflow.agreement import prompts_sha256, read_prompts
from finetune_mlflow.config import Config
from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.evaluation import run_predictions
from finetune_mlflow.run_cost import check_eval_cost
from finetune_mlflow.scoring import resolve_model
from finetune_mlflow.scratch import download_artifacts
from finetune_mlflow.tracking import log_values, quote, step_run

logger = logging.getLogger(__name__)

CAPTURE_TABLE = "captured_answers.json"


@dataclass(frozen=True)
class Capture:
    run_id: str
    answers: dict[str, str]  # prompt id -> answer ("" when the request failed)
    reused: bool


def canonical_reference(model: str) -> str:
    """`models:/name@alias` as the version it points at now, so a capture names the model that answered."""
    if model.startswith("models:/") and "@" in model:
        name, alias = model[len("models:/"):].split("@", 1)
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return model


def read_capture(run_id: str) -> dict[str, str]:
    table = json.loads(download_artifacts(run_id=run_id, artifact_path=CAPTURE_TABLE).read_text(encoding="utf-8"))
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    return {str(r["id"]): ("" if isinstance(r.get("error"), str) and r["error"] else str(r.get("answer") or ""))
            for r in rows}


def find_capture(model: str, prompts_path: str) -> str | None:
    """The newest finished capture run of `model` on these prompts, in any experiment of the store."""
    sha = prompts_sha256(read_prompts(prompts_path))
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`finetune.step` = 'capture' and tags.`finetune.captured_model` = "
                              f"{quote(canonical_reference(model))} and tags.`finetune.prompts_sha256` = {quote(sha)} "
                              "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def run_capture(config: Config, model: str, prompts_path: str) -> Capture:
    if not prompts_path:
        raise FinetuneError("capture needs -P prompts=<file.jsonl|file.csv> with question and context")
    prompts = read_prompts(prompts_path)
    reference = canonical_reference(model)
    sha = prompts_sha256(prompts)
    previous = find_capture(reference, prompts_path)
    if previous:
        logger.info("reusing capture run %s of %s on these prompts", previous, reference)
        return Capture(previous, read_capture(previous), True)
    resolved = resolve_model(reference, config)
    with step_run("capture", run_name=f"capture {reference}", tags={
            "finetune.captured_model": reference, "finetune.prompts_sha256": sha,
            "finetune.provider": resolved.provider.name}) as run:
        check_eval_cost(prompts, [resolved.model_id], config, resolved.provider.name)
        examples = [{**p, "answers": [""]} for p in prompts]
        done = run_predictions(lambda q, c: resolved.provider.predict(resolved.model_id, q, c), examples,
                               min(config.evaluate.max_concurrency, resolved.provider.max_concurrency))
        frame = pd.DataFrame(prompts)
        with warnings.catch_warnings():  # MLflow warns that a local path matches two equivalent source classes
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_pandas(frame, source=str(prompts_path), name="captured prompts")
        mlflow.log_input(dataset, context="capture")
        mlflow.log_table({"id": [p["id"] for p in prompts], "question": [p["question"] for p in prompts],
                          "context": [p["context"] for p in prompts],
                          "answer": [r.prediction for r in done.results],
                          "latency_ms": [r.latency_ms for r in done.results],
                          "error": [r.error or "" for r in done.results]}, CAPTURE_TABLE)
        errors = sum(1 for r in done.results if r.error)
        log_values(MlflowClient(), run.info.run_id, metrics={"capture_n": len(prompts), "capture_error_count": errors})
        if errors / len(prompts) > config.evaluate.max_error_rate:
            raise FinetuneError(f"{errors} of {len(prompts)} capture requests failed (over evaluate.max_error_rate="
                                f"{config.evaluate.max_error_rate}); first error: "
                                f"{next(r.error for r in done.results if r.error)}")
        return Capture(run.info.run_id, {r.id: ("" if r.error else r.prediction) for r in done.results}, False)

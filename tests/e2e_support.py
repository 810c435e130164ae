"""Shared pieces of the end-to-end tests: answerers for the fakes that read the request, run helpers, polling.

The e2e tests run the project the way a user does (`mlflow.projects.run` or `python -m finetune_mlflow` in a
subprocess), with the real SDK clients pointed at the in-process fakes through the environment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.tracking import MlflowClient

from tests.waiting import process_progress, until

ROOT = Path(__file__).resolve().parents[1]
PROMPT = re.compile(r"Passage:\n(?P<context>.*)\n\nQuestion: (?P<question>.*)\nAnswer:\s*$", re.S)


def use_project_python(monkeypatch) -> None:
    """`mlflow run` and the MLproject commands call `python`/`mlflow`: make them this interpreter's."""
    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def gold_answers(squad_file: Path) -> dict[str, list[str]]:
    """question text -> gold answer texts, from a SQuAD v1.1 file."""
    document = json.loads(squad_file.read_text(encoding="utf-8"))
    out: dict[str, list[str]] = {}
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                out.setdefault(qa["question"].strip(), []).extend(a["text"] for a in qa["answers"])
    return out


def bucket(question: str) -> int:
    """A stable 0-3 bucket per question, deciding how the fake models answer it."""
    return zlib.crc32(question.encode("utf-8")) % 4


def is_tuned(model: str) -> bool:
    return model.startswith("ft:") or "/endpoints/" in model


class Answerer:
    """Answers a prompt from its own text, so EM/F1 are known in advance.

    Per question (by a stable hash bucket 0-3), by the asking model's quality:

    - `base` (a base model): right on bucket 0 only;
    - `tuned` (a final tuned model): right on 0 and 2, the gold answer plus extra words on 1 (partial F1);
    - `midway` (an intermediate checkpoint, by default): right on 0, partial on 1: between base and tuned;
    - `better` (a checkpoint set so in `checkpoint_quality`): right on 0, 1 and 2, clearly above tuned;
    - `noisy` (likewise): tuned, plus exactly one bucket-3 question right: a higher F1 no paired bootstrap
      can tell from chance.

    `checkpoint_step(model)` says which models are intermediate checkpoints (the fakes know: pass theirs), and
    `checkpoint_quality` maps a checkpoint's step to its quality. `expected_scores` recomputes EM/F1 from the
    questions the fake was actually asked.
    """

    WRONG = "no idea at all"

    def __init__(self, golds: dict[str, list[str]],
                 checkpoint_step: Callable[[str], int | None] = lambda model: None,
                 tuned: Callable[[str], bool] = is_tuned):
        self.golds = golds
        self.tuned = tuned
        self.asked: list[tuple[str, str]] = []  # (model, question)
        self.checkpoint_step = checkpoint_step
        self.checkpoint_quality: dict[int, str] = {}
        self.lucky_question = min((q for q in golds if bucket(q) == 3), default=None)

    def quality(self, model: str) -> str:
        step = self.checkpoint_step(model)
        if step is not None:
            return self.checkpoint_quality.get(step, "midway")
        return "tuned" if self.tuned(model) else "base"

    def answer_text(self, model: str, question: str) -> str:
        gold = self.golds.get(question)
        if not gold:
            return self.WRONG
        b, quality = bucket(question), self.quality(model)
        right = {"base": {0}, "tuned": {0, 2}, "midway": {0}, "better": {0, 1, 2}, "noisy": {0, 2}}[quality]
        if b in right or (quality == "noisy" and question == self.lucky_question):
            return gold[0]
        if b == 1 and quality in ("tuned", "midway", "noisy"):
            return f"{gold[0]} and some more"
        return self.WRONG

    def answer(self, model: str, prompt: str) -> str:
        match = PROMPT.match(prompt)
        if not match:
            return self.WRONG
        question = match.group("question").strip()
        if question in self.golds:  # not, e.g., the input example MLflow validates a logged model with
            self.asked.append((model, question))
        return self.answer_text(model, question)


def expected_scores(answerer: Answerer, model_filter: Callable[[str], bool]) -> tuple[float, float, int]:
    """(EM, F1 in 0-100, n) the evaluation should report, recomputed with the SQuAD v1.1 scorer."""
    from finetune_mlflow.squad_metrics import best_over_golds

    seen: dict[str, tuple[float, float]] = {}
    for model, question in answerer.asked:
        if model_filter(model) and question not in seen:
            seen[question] = best_over_golds(answerer.answer_text(model, question), answerer.golds[question])
    n = len(seen)
    assert n, "the fake was never asked"
    return 100 * sum(e for e, _ in seen.values()) / n, 100 * sum(f for _, f in seen.values()) / n, n


def openai_responder(answerer: Answerer) -> Callable[[dict[str, Any]], str]:
    def respond(body: dict[str, Any]) -> str:
        user = next((m.get("content") or "" for m in body["messages"] if m.get("role") == "user"), "")
        return answerer.answer(body["model"], user)
    return respond


def vertex_responder(answerer: Answerer) -> Callable[[str, dict[str, Any]], str]:
    def respond(model: str, body: dict[str, Any]) -> str:
        text = "".join(part.get("text", "") for content in body.get("contents", [])
                       for part in content.get("parts", []))
        return answerer.answer(model, text)
    return respond


def run_entry_point(entry_point: str, parameters: dict[str, str], *, run_id: str | None = None,
                    synchronous: bool = True):
    return mlflow.projects.run(str(ROOT), entry_point=entry_point, parameters=parameters, env_manager="local",
                               synchronous=synchronous, run_id=run_id)


def base_metrics(run_id: str) -> dict[str, float]:
    """The base model's scores a tune or sync run was compared with: they live on its base evaluation run."""
    client = MlflowClient()
    return dict(client.get_run(client.get_run(run_id).data.tags["finetune.base_eval_run_id"]).data.metrics)


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged point of `key`, in step order (duplicates kept, so tests can see them)."""
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def wait_for(condition: Callable[[], Any], proc: subprocess.Popen | None = None, log_path: Path | None = None, *,
             timeout: float | None = None, interval: float = 0.1, what: str = "condition"):
    """Until `condition()` holds, while `proc` keeps moving (CPU or log output; see tests/waiting.py). Without a
    process to watch (several at once), a hang guard of `timeout` seconds bounds the wait instead."""
    if proc is not None:
        return until(condition, process_progress(proc, log_path), interval=interval, what=what)
    if timeout is None:
        raise TypeError("wait_for needs a process to watch or a timeout")
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return value


def start_cli(args: list[str], log_path: Path) -> subprocess.Popen:
    """`python -m finetune_mlflow ...` in its own process group (so a kill takes any child with it)."""
    # Create the SQLite store's tables here first: two processes migrating a fresh database at once collide.
    MlflowClient().search_experiments()
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "finetune_mlflow", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group: no handler runs, nothing is marked, the run stays RUNNING."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def run_with_job_tag(proc: subprocess.Popen, log_path: Path, experiment_id: str = "0") -> Callable[[], Any]:
    """A condition: the tune run that already has its job id and a few train_loss points (fails fast if the
    process ended first)."""
    def condition():
        if proc.poll() is not None:
            raise AssertionError(f"the tune process exited ({proc.returncode}) before it could be killed:\n"
                                 + log_path.read_text(errors="replace")[-3000:])
        client = MlflowClient()
        runs = client.search_runs([experiment_id], "tags.`finetune.step` = 'tune'")
        for run in runs:
            if run.data.tags.get("finetune.job_id") and len(client.get_metric_history(run.info.run_id,
                                                                                        "train_loss")) >= 3:
                return run
        return None
    return condition


def all_experiment_ids() -> list[str]:
    """Every experiment of the test's store: runs go to the experiment their config names."""
    return [e.experiment_id for e in MlflowClient().search_experiments()]

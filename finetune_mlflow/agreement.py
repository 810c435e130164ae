"""Pure: prompts for `capture` (JSONL or CSV of question + context, e.g. sampled production traffic) and the
agreement of a candidate's answers with a model's recorded ones (SQuAD EM/F1 with the recorded answer as the
reference, bootstrap 95% intervals), which still measures a model after it stopped answering."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from finetune_mlflow.errors import DataError
from finetune_mlflow.squad_metrics import best_over_golds
from finetune_mlflow.stats import bootstrap_interval

MAX_PROMPTS = 100_000


def _prompt(row: Any, path: Path, line: int) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise DataError(str(path), line, f"expected an object with question and context, got {type(row).__name__}")
    question, context = row.get("question"), row.get("context")
    for name, value in (("question", question), ("context", context)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(str(path), line, f"{name} is missing or empty")
    identifier = str(row.get("id") or "").strip() or f"prompt-{line}"
    return {"id": identifier, "question": question.strip(), "context": context.strip()}


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts in file order; a bad row is a DataError with its line, a repeated id too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(str(path), None, "file not found (a JSONL or CSV of question and context)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), None, f"cannot read it ({e})") from None
    rows: list[tuple[int, Any]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"question", "context"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(str(path), 1, f"header lacks {', '.join(sorted(missing))}")
        rows = [(index + 2, row) for index, row in enumerate(reader)]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(str(path), number, f"not valid JSON ({e.msg})") from None
    if not rows:
        raise DataError(str(path), None, "no prompts")
    if len(rows) > MAX_PROMPTS:
        raise DataError(str(path), None, f"{len(rows)} prompts; at most {MAX_PROMPTS} are captured")
    prompts, seen = [], {}
    for number, row in rows:
        prompt = _prompt(row, path, number)
        if prompt["id"] in seen:
            raise DataError(str(path), number, f"id {prompt['id']!r} already used on line {seen[prompt['id']]}")
        seen[prompt["id"]] = number
        prompts.append(prompt)
    return prompts


def prompts_sha256(prompts: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt["id"], prompt["question"], prompt["context"]]).encode() + b"\n")
    return digest.hexdigest()


def agreement(candidate: Mapping[str, str], recorded: Mapping[str, str], *, samples: int, seed: int
              ) -> dict[str, float]:
    """`agreement_f1`/`agreement_exact_match` (0-100) with 95% bootstrap intervals, over the prompts the recorded
    model answered (a missing candidate answer scores 0); empty when there are none."""
    ids = [i for i in recorded if recorded[i]]
    if not ids:
        return {}
    scores = [best_over_golds(candidate.get(i, ""), [recorded[i]]) for i in ids]
    metrics = {"agreement_n": float(len(ids))}
    for name, position in (("exact_match", 0), ("f1", 1)):
        interval = bootstrap_interval([100.0 * s[position] for s in scores], samples=samples, seed=seed)
        metrics[f"agreement_{name}"] = interval.estimate
        metrics[f"agreement_{name}_ci_low"] = interval.low
        metrics[f"agreement_{name}_ci_high"] = interval.high
    return metrics

"""Pure checks and estimates for Gemini supervised-tuning JSONL (Vertex AI), run before any upload.

No network and no MLflow here: the Vertex provider's preflight calls these on `prepared/vertex/*.jsonl`.

Record shape (one JSON object per line), as Vertex AI documents for Gemini supervised tuning::

    {"systemInstruction": {"role": "system", "parts": [{"text": "..."}]},      # optional
     "contents": [{"role": "user", "parts": [{"text": "..."}]},
                  {"role": "model", "parts": [{"text": "..."}]}]}

`contents` alternates `user` and `model` turns, starts with `user` and ends with `model`; every part carries a
non-empty `text`.

Token counts are an *estimate*: ~4 characters per token (`costing.CHARS_PER_TOKEN`), rounded up per text part, the rule
of thumb Google documents for Gemini models. The real tokenizer differs by a few percent either way, so the
limits below are checked against the estimate and the cost is an approximation, not a quote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from finetune_mlflow import costing
from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.errors import DataError
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, training_answer, user_prompt

_ROLES = ("user", "model")
_TOP_LEVEL_KEYS = frozenset({"contents", "systemInstruction"})


@dataclass(frozen=True)
class DatasetStats:
    """What one Gemini JSONL file holds, by the estimate above."""

    path: str
    n_examples: int
    total_tokens: int
    max_example_tokens: int


def to_gemini(example: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical example as one Gemini supervised-tuning record (system instruction, user turn, model turn)."""
    return {
        "systemInstruction": {"role": "system", "parts": [{"text": SYSTEM_INSTRUCTION}]},
        "contents": [
            {"role": "user", "parts": [{"text": user_prompt(example["question"], example["context"])}]},
            {"role": "model", "parts": [{"text": training_answer(example["answers"])}]},
        ],
    }


def _check_parts(parts: Any, where: str, path: str, line: int) -> int:
    if not isinstance(parts, list) or not parts:
        raise DataError(path, line, f"{where}.parts must be a non-empty list of {{\"text\": ...}} objects")
    tokens = 0
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise DataError(path, line, f"{where}.parts[{j}] must be an object, got {type(part).__name__}")
        if "text" not in part:
            keys = ", ".join(sorted(part)) or "nothing"
            raise DataError(path, line, f"{where}.parts[{j}] has no \"text\" (has {keys}); only text parts are supported")
        text = part["text"]
        if not isinstance(text, str):
            raise DataError(path, line, f"{where}.parts[{j}].text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(path, line, f"{where}.parts[{j}].text is empty")
        tokens += approx_tokens(text)
    return tokens


def example_tokens(record: Any, path: str | Path = "<record>", line: int | None = None) -> int:
    """Validate one parsed record and return its estimated token count; raises DataError(path, line, reason)."""
    path = str(path)
    if not isinstance(record, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _TOP_LEVEL_KEYS)
    if unknown:
        raise DataError(path, line, f"unexpected key {unknown[0]!r}; a Gemini tuning record has only contents and systemInstruction")
    tokens = 0
    if "systemInstruction" in record:
        system = record["systemInstruction"]
        if not isinstance(system, dict):
            raise DataError(path, line, "systemInstruction must be an object with parts")
        tokens += _check_parts(system.get("parts"), "systemInstruction", path, line)
    contents = record.get("contents")
    if not isinstance(contents, list) or not contents:
        raise DataError(path, line, "contents must be a non-empty list of user/model turns")
    for i, turn in enumerate(contents):
        where = f"contents[{i}]"
        if not isinstance(turn, dict):
            raise DataError(path, line, f"{where} must be an object, got {type(turn).__name__}")
        role = turn.get("role")
        expected = _ROLES[i % 2]
        if role not in _ROLES:
            raise DataError(path, line, f"{where}.role is {role!r}; expected \"user\" or \"model\"")
        if role != expected:
            raise DataError(path, line, f"{where}.role is {role!r}; turns must alternate user/model starting with user")
        tokens += _check_parts(turn.get("parts"), where, path, line)
    if contents[-1].get("role") != "model":
        raise DataError(path, line, "the last turn must be a \"model\" turn (the target the model is tuned on)")
    return tokens


def read_dataset(path: str | Path, *, max_example_tokens: int = 0) -> DatasetStats:
    """Validate every line of a Gemini JSONL file; `max_example_tokens` > 0 refuses longer examples."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(str(path), None, "file does not exist; run the prepare step first") from None
    except UnicodeDecodeError as e:
        raise DataError(str(path), None, f"not UTF-8 text ({e.reason})") from None
    n = total = largest = 0
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last record
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            raise DataError(str(path), number, "empty line; every line must be one JSON record")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), number, f"not valid JSON ({e.msg} at column {e.colno})") from None
        tokens = example_tokens(record, path, number)
        if max_example_tokens > 0 and tokens > max_example_tokens:
            raise DataError(
                str(path),
                number,
                f"example is ~{tokens} tokens (estimated at {costing.CHARS_PER_TOKEN} chars/token), above the "
                f"{max_example_tokens}-token limit (vertex.max_example_tokens); shorten it or lower data.max_example_chars",
            )
        n += 1
        total += tokens
        largest = max(largest, tokens)
    if n == 0:
        raise DataError(str(path), None, "no examples")
    return DatasetStats(str(path), n, total, largest)


def check_validation_size(stats: DatasetStats, max_validation_examples: int) -> None:
    """Vertex caps the validation set; refuse a bigger one before anything is uploaded."""
    if max_validation_examples > 0 and stats.n_examples > max_validation_examples:
        raise DataError(
            stats.path,
            None,
            f"{stats.n_examples} validation examples, above the Vertex AI limit of {max_validation_examples} "
            "(vertex.max_validation_examples); set data.max_validation_examples to at most that",
        )


def price_per_million(base_model: str, prices: Mapping[str, float] | None = None) -> float | None:
    """USD per 1M training tokens (dataset tokens x epochs) for `base_model` from the config's table
    (`vertex.training_price_per_million_tokens`, dated in the experiment YAML; none live in code)."""
    model = base_model.rsplit("/", 1)[-1]  # "publishers/google/models/gemini-..." -> "gemini-..."
    return costing.price_per_million(model, [prices or {}])


def answer_text(response: Any) -> tuple[str, str | None]:
    """A generateContent response's answer (its first candidate's non-thought parts) and finish reason name."""
    candidate = response.candidates[0] if response.candidates else None
    if candidate is None:
        return "", None
    finish = getattr(candidate.finish_reason, "value", candidate.finish_reason)
    parts = candidate.content.parts if candidate.content is not None else None
    text = "".join(part.text or "" for part in parts or [] if not part.thought)
    return text, str(finish) if finish is not None else None


def output_tokens(usage: Any) -> int | None:
    """Billed output tokens: the answer's plus the thinking tokens, which Gemini bills as output; None if unreported."""
    if usage is None or (usage.candidates_token_count is None and usage.thoughts_token_count is None):
        return None
    return (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)

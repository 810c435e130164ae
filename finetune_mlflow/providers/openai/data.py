"""Pure helpers for OpenAI fine-tuning data: validate chat JSONL, estimate tokens and cost, parse result files.

No network and no MLflow here, so every rule is unit-tested on its own and `preflight` can run before any upload.

Validation follows OpenAI's data-preparation guidance for chat fine-tuning ("Data preparation and analysis for
chat model fine-tuning"): every line is a JSON object with a `messages` list; every message has a known `role`
and string `content` and no unrecognized keys; every example has at least one assistant message; and a training
file has at least 10 examples (the API's minimum).

Token counts are an approximation chosen so no tokenizer download is needed: about 4 characters per token
(the rule of thumb OpenAI documents for English text), rounded up per message, plus a fixed overhead of
`TOKENS_PER_MESSAGE` per message and `TOKENS_PER_EXAMPLE` per example for the chat format's role and separator
tokens. It is meant for a cost guard and context-limit warnings, not billing to the cent.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from finetune_mlflow import costing
from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.errors import DataError
from finetune_mlflow.prompt import chat_messages, training_answer
from finetune_mlflow.records import jsonl_objects
from finetune_mlflow.providers.base import MetricPoint

MIN_TRAIN_EXAMPLES = 10
ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Keys a chat message may carry in the fine-tuning format (weight: assistant-only 0/1 training weight).
ALLOWED_MESSAGE_KEYS = frozenset({"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"})
# Keys an example may carry next to `messages` (function-calling fine-tuning).
ALLOWED_EXAMPLE_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})

TOKENS_PER_MESSAGE = 4
TOKENS_PER_EXAMPLE = 3

# Result-file / event metric names -> the shared keys every provider logs.
METRIC_KEYS: dict[str, str] = {
    "train_loss": "train_loss",
    "valid_loss": "val_loss",
    "train_mean_token_accuracy": "train_mean_token_accuracy",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "valid_accuracy": "valid_mean_token_accuracy",
    "full_valid_loss": "full_valid_loss",
    "full_valid_mean_token_accuracy": "full_valid_mean_token_accuracy",
}
# OpenAI's own accuracy keys are also logged under the names every provider shares (Vertex logs these), so runs
# of both providers line up in one MLflow chart.
SHARED_ACCURACY_KEYS: dict[str, str] = {
    "train_mean_token_accuracy": "train_token_accuracy",
    "valid_mean_token_accuracy": "val_token_accuracy",
}


# --------------------------------------------------------------------------------------------------- validation


def to_openai_chat(example: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical example as one chat fine-tuning record (system, user prompt, assistant answer)."""
    return {"messages": chat_messages(example["question"], example["context"], training_answer(example["answers"]))}


def validate_chat_example(example: Any, path: str | Path, line: int) -> None:
    """Raise DataError(path, line, reason) when one parsed JSONL record is not a usable chat example."""
    if not isinstance(example, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(example).__name__}")
    unknown = sorted(set(example) - ALLOWED_EXAMPLE_KEYS)
    if unknown:
        raise DataError(path, line, f"unrecognized key {unknown[0]!r}; an example holds 'messages'")
    messages = example.get("messages")
    if messages is None:
        raise DataError(path, line, "missing 'messages' list")
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "'messages' must be a non-empty list")
    has_assistant = False
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise DataError(path, line, f"{where}: expected an object, got {type(message).__name__}")
        unknown = sorted(set(message) - ALLOWED_MESSAGE_KEYS)
        if unknown:
            raise DataError(path, line, f"{where}: unrecognized key {unknown[0]!r}")
        if "role" not in message:
            raise DataError(path, line, f"{where}: missing 'role'")
        role = message["role"]
        if role not in ALLOWED_ROLES:
            raise DataError(
                path, line, f"{where}: unrecognized role {role!r}; expected one of {', '.join(sorted(ALLOWED_ROLES))}"
            )
        content = message.get("content")
        if content is None and role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            pass  # an assistant turn that only calls a tool has no text content
        elif "content" not in message:
            raise DataError(path, line, f"{where}: missing 'content'")
        elif not isinstance(content, str):
            raise DataError(path, line, f"{where}: 'content' must be a string, got {type(content).__name__}")
        if "weight" in message:
            if role != "assistant":
                raise DataError(path, line, f"{where}: 'weight' is only allowed on assistant messages")
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                raise DataError(path, line, f"{where}: 'weight' must be 0 or 1, got {message['weight']!r}")
        if role == "assistant":
            has_assistant = True
    if not has_assistant:
        raise DataError(path, line, "no assistant message; every example needs the answer to train on")


def parse_chat_jsonl(text: str, path: str | Path, *, min_examples: int = MIN_TRAIN_EXAMPLES) -> list[dict[str, Any]]:
    """Validate JSONL text (one chat example per line, 1-based line numbers in errors) and return the examples."""
    examples: list[dict[str, Any]] = []
    for line_no, record in jsonl_objects(text, path):
        validate_chat_example(record, path, line_no)
        examples.append(record)
    if len(examples) < min_examples:
        raise DataError(
            path, None, f"{len(examples)} examples; OpenAI fine-tuning needs at least {min_examples}"
        )
    return examples


def load_chat_jsonl(path: str | Path, *, min_examples: int = MIN_TRAIN_EXAMPLES) -> list[dict[str, Any]]:
    """Read and validate a chat fine-tuning JSONL file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found; run the prepare step first") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, "not valid UTF-8") from None
    return parse_chat_jsonl(text, path, min_examples=min_examples)


# ------------------------------------------------------------------------------------------- tokens and cost


def estimate_example_tokens(example: Mapping[str, Any]) -> int:
    """Approximate tokens of one chat example (see the module docstring for the rule)."""
    total = TOKENS_PER_EXAMPLE
    for message in example.get("messages", []):
        total += TOKENS_PER_MESSAGE + approx_tokens(message.get("content"))
        if message.get("name"):
            total += approx_tokens(message["name"])
        if message.get("tool_calls") or message.get("function_call"):
            total += approx_tokens(json.dumps(message.get("tool_calls") or message.get("function_call")))
    if example.get("tools") or example.get("functions"):
        total += approx_tokens(json.dumps(example.get("tools") or example.get("functions")))
    return total


@dataclass(frozen=True)
class TokenEstimate:
    n_examples: int
    total_tokens: int
    max_example_tokens: int
    # Examples longer than the context limit; OpenAI truncates them to the limit.
    n_over_limit: int


def estimate_dataset_tokens(examples: Iterable[Mapping[str, Any]], context_limit_tokens: int) -> TokenEstimate:
    counts = [estimate_example_tokens(example) for example in examples]
    return TokenEstimate(
        n_examples=len(counts),
        total_tokens=sum(counts),
        max_example_tokens=max(counts, default=0),
        n_over_limit=sum(1 for c in counts if context_limit_tokens > 0 and c > context_limit_tokens),
    )


def _strip_fine_tuned(model: str) -> str:
    # Continuing from a tuned model bills at its base model's price: "ft:gpt-4o-mini-2024-07-18:org::id" -> base.
    if model.startswith("ft:"):
        parts = model.split(":")
        return parts[1] if len(parts) > 1 else model
    return model


def training_price(model: str, prices: Mapping[str, float] | None = None) -> float | None:
    """USD per 1M training tokens for `model` from the config's table (`openai.training_price_per_million_tokens`,
    dated in the experiment YAML: prices change, so none live in code)."""
    return costing.price_per_million(_strip_fine_tuned(model), [prices or {}])


# ------------------------------------------------------------------------------------------------- metrics


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metrics_from_data(data: Mapping[str, Any], timestamp_ms: int, *, step: int | None = None) -> list[MetricPoint]:
    """A metrics event's `data` (or a result-file row) -> MetricPoints under the shared keys; None/blank skipped."""
    if step is None:
        raw_step = _as_float(data.get("step"))
        if raw_step is None:
            return []
        step = int(raw_step)
    points: list[MetricPoint] = []
    seen: set[str] = set()
    for source, key in METRIC_KEYS.items():
        if key in seen or source not in data:
            continue
        value = _as_float(data[source])
        if value is None:
            continue
        seen.add(key)
        points.append(MetricPoint(key=key, value=value, step=step, timestamp_ms=int(timestamp_ms)))
        if key in SHARED_ACCURACY_KEYS:
            points.append(MetricPoint(SHARED_ACCURACY_KEYS[key], value, step, int(timestamp_ms)))
    return points


def decode_result_file(content: bytes | str) -> str:
    """The result file's CSV text: the API serves it base64-encoded today; plain CSV is accepted too."""
    raw = content.decode("utf-8-sig") if isinstance(content, bytes) else content.lstrip("\ufeff")
    stripped = raw.strip()
    if stripped.lower().startswith("step"):
        return stripped
    try:
        decoded = base64.b64decode("".join(stripped.split()), validate=True).decode("utf-8-sig").strip()
    except (binascii.Error, ValueError):
        decoded = ""
    if decoded.lower().startswith("step"):
        return decoded
    raise DataError("<result file>", None, "neither CSV with a 'step' header nor base64-encoded CSV")


def parse_result_file(content: bytes | str, *, timestamp_ms: int = 0, source: str = "<result file>") -> list[MetricPoint]:
    """Parse a job result file (columns step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,...)
    into MetricPoints in step order. Blank cells (steps without validation) yield no point. The file has no
    per-row time, so every point gets `timestamp_ms` (e.g. the job's finished_at)."""
    try:
        text = decode_result_file(content)
    except DataError:
        raise DataError(source, None, "neither CSV with a 'step' header nor base64-encoded CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    reader.fieldnames = fields
    if "step" not in fields:
        raise DataError(source, 1, f"no 'step' column in header {fields}")
    points: list[MetricPoint] = []
    for row_no, row in enumerate(reader, start=2):
        step = _as_float(row.get("step"))
        if step is None:
            raise DataError(source, row_no, f"step {row.get('step')!r} is not a number")
        points.extend(metrics_from_data(row, timestamp_ms, step=int(step)))
    points.sort(key=lambda p: (p.step, p.key))
    return points


def total_steps(events: Iterable[Any]) -> int | None:
    """The job's total steps from the newest `metrics` event that reports `data.total_steps` (events newest first);
    None when none does."""
    for event in events:
        data = event.data if isinstance(event.data, dict) else None
        if event.type == "metrics" and data and _as_float(data.get("total_steps")):
            return int(float(data["total_steps"]))
    return None

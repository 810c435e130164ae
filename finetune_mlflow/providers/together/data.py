"""Pure helpers for Together fine-tuning data: the conversational record, its validation with file and line, and
token estimates for the cost guard. No network, no MLflow, no SDK import.

Together's "conversational" format (docs.together.ai, "Data preparation") is one JSON object per line with a
`messages` list of `{role, content}`; roles are system, user and assistant, and the loss is taken on the assistant
turns (`train_on_inputs: auto`). The SDK's own `check_file` runs afterwards in `staging.py`; this module adds what
it does not say: the line number of the first bad record.

Tokens are estimated with the shared 4-characters-per-token rule plus a per-message overhead for the chat
template's role markers, enough for a cost guard and the sequence-length check, not for billing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from finetune_mlflow.costing import approx_tokens
from finetune_mlflow.errors import DataError
from finetune_mlflow.records import jsonl_objects
from finetune_mlflow.prompt import chat_messages, training_answer

ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "weight"})
TOKENS_PER_MESSAGE = 4
TOKENS_PER_EXAMPLE = 3


def to_together_chat(example: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical example as one conversational record (system, user prompt, assistant answer)."""
    return {"messages": chat_messages(example["question"], example["context"], training_answer(example["answers"]))}


def check_record(record: Any, path: str | Path, line: int) -> None:
    """Raise DataError(path, line, reason) unless `record` is a conversational example Together trains on."""
    if not isinstance(record, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(record).__name__}")
    extra = sorted(set(record) - {"messages"})
    if extra:
        raise DataError(path, line, f"unrecognized key {extra[0]!r}; a conversational example holds 'messages'")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "'messages' must be a non-empty list")
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise DataError(path, line, f"{where}: expected an object, got {type(message).__name__}")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise DataError(path, line, f"{where}: unrecognized key {unknown[0]!r}")
        if message.get("role") not in ROLES:
            raise DataError(path, line, f"{where}: role {message.get('role')!r} is not one of "
                                        f"{', '.join(sorted(ROLES))}")
        if not isinstance(message.get("content"), str):
            raise DataError(path, line, f"{where}: 'content' must be a string")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(path, line, "no non-empty assistant message; every example needs the answer to train on")


def load_records(path: str | Path, *, min_examples: int = 1) -> list[dict[str, Any]]:
    """Read and check a conversational JSONL file (1-based line numbers in errors)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found; run the prepare step first") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, raw[: e.start].count(b"\n") + 1, "not valid UTF-8") from None
    records = []
    for line_no, record in jsonl_objects(text, path):
        check_record(record, path, line_no)
        records.append(record)
    if len(records) < min_examples:
        raise DataError(path, None, f"{len(records)} examples; at least {min_examples} needed")
    return records


def example_tokens(record: Mapping[str, Any]) -> int:
    return TOKENS_PER_EXAMPLE + sum(TOKENS_PER_MESSAGE + approx_tokens(m.get("content"))
                                    for m in record.get("messages", []))


@dataclass(frozen=True)
class TokenCount:
    n_examples: int
    total_tokens: int
    longest: int


def count_tokens(records: Iterable[Mapping[str, Any]]) -> TokenCount:
    counts = [example_tokens(r) for r in records]
    return TokenCount(len(counts), sum(counts), max(counts, default=0))


def billed_tokens(train_tokens: int, epochs: int, validation_tokens: int, n_evals: int) -> int:
    """Together bills (n_epochs x training tokens) + (n_evals x validation tokens) (docs: fine-tuning pricing)."""
    return int(train_tokens) * int(epochs) + int(validation_tokens) * int(n_evals)

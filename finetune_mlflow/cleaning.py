"""Pure data steps of `prepare`: normalize, dedupe, validate, split, truncate. No I/O, no MLflow.

Each returns new lists plus what it dropped, so the step module can log every count; nothing is lost silently.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

from finetune_mlflow.errors import DataError
from finetune_mlflow.records import Example


def normalize_text(text: str) -> str:
    """Unicode NFC plus whitespace collapsed to single spaces: the same answer always has the same bytes.
    (`str.split()` splits on exactly the characters `\\s` matches in a str pattern, several times faster.)"""
    return " ".join(unicodedata.normalize("NFC", text).split())


def normalize_example(example: Example, shared: dict[str, str] | None = None) -> Example:
    """`shared` memoizes the texts many examples repeat (a SQuAD context has about five questions, a title
    hundreds), so each is normalized once."""
    shared = {} if shared is None else shared
    for key in ("title", "context"):
        if example[key] not in shared:
            shared[example[key]] = normalize_text(example[key])
    return {
        **example,
        "title": shared[example["title"]],
        "question": normalize_text(example["question"]),
        "context": shared[example["context"]],
        "answers": [normalize_text(answer) for answer in example["answers"]],
    }


def normalize_examples(examples: Iterable[Example]) -> list[Example]:
    shared: dict[str, str] = {}
    return [normalize_example(example, shared) for example in examples]


def _content_key(example: Example) -> tuple[str, str, tuple[str, ...]]:
    """Hashable content of an example (a tuple of the strings themselves: no encoding, and a shared context's
    hash is computed once)."""
    return example["question"], example["context"], tuple(example["answers"])


@dataclass(frozen=True)
class Deduplicated:
    examples: list[Example]
    n_exact_duplicates: int
    n_question_context_duplicates: int

    @property
    def n_dropped(self) -> int:
        return self.n_exact_duplicates + self.n_question_context_duplicates


def deduplicate(examples: list[Example], path: str) -> Deduplicated:
    """Drop exact duplicates, then repeated (question, context) pairs (first wins).

    The same id with different content is not a duplicate but a conflict: it is refused, since either answer
    could be the wrong one.
    """
    seen_content: set[tuple] = set()
    seen_pairs: set[tuple[str, str]] = set()
    content_by_id: dict[str, tuple[tuple, Any]] = {}
    kept: list[Example] = []
    exact = pairs = 0
    for example in examples:
        content = _content_key(example)
        previous = content_by_id.get(example["id"])
        if previous is not None and previous[0] != content:
            raise DataError(path, example.get("source_line"),
                            f"id {example['id']!r} appears again with different content (first at line "
                            f"{previous[1]}); give each example a unique id")
        content_by_id.setdefault(example["id"], (content, example.get("source_line")))
        if content in seen_content:
            exact += 1
            continue
        pair = (example["question"], example["context"])
        if pair in seen_pairs:
            pairs += 1
            continue
        seen_content.add(content)
        seen_pairs.add(pair)
        kept.append(example)
    return Deduplicated(kept, exact, pairs)


def example_problem(example: Example, *, extractive: bool, max_chars: int) -> str | None:
    """Why an example cannot be used, or None when it can."""
    if example.get("answer_problem"):  # found by the reader (a SQuAD answer_start that cannot be right)
        return example["answer_problem"]
    for key in ("question", "context"):
        if not example[key]:
            return f"empty {key}"
    if not example["answers"] or any(not answer for answer in example["answers"]):
        return "empty answer"
    size = len(example["question"]) + len(example["context"]) + max(len(a) for a in example["answers"])
    if size > max_chars:
        return f"example is {size} characters, over data.max_example_chars={max_chars}"
    if extractive:
        for answer in example["answers"]:
            if answer not in example["context"]:
                return f"answer {answer!r:.60} does not occur in the context (extractive data needs it to)"
    return None


@dataclass(frozen=True)
class Validated:
    examples: list[Example]
    # (line, reason) of every dropped example, for the log and the `dropped.jsonl` artifact.
    dropped: list[dict[str, Any]] = field(default_factory=list)


def validate_examples(examples: list[Example], path: str, *, extractive: bool, max_chars: int,
                      on_invalid: str) -> Validated:
    kept, dropped = [], []
    for example in examples:
        problem = example_problem(example, extractive=extractive, max_chars=max_chars)
        if problem is None:
            kept.append(example)
        elif on_invalid == "fail":
            raise DataError(path, example.get("source_line"),
                            f"{problem} (id {example['id']!r}); fix the row or set data.on_invalid: drop")
        else:
            dropped.append({"file": path, "line": example.get("source_line"), "id": example["id"],
                            "reason": problem})
    return Validated(kept, dropped)


def split_by_article(examples: list[Example], validation_fraction: float) -> tuple[list[Example], list[Example]]:
    """Split on whole articles (title, or context when untitled) with scikit-learn's GroupShuffleSplit and a fixed
    seed: no article is on both sides, and the split depends on the set of articles, not on input order."""
    from sklearn.model_selection import GroupShuffleSplit  # imported here: only a split pays its import time

    articles = [example["title"] or example["context"] for example in examples]
    if len(set(articles)) < 2:
        return list(examples), []
    splitter = GroupShuffleSplit(n_splits=1, test_size=validation_fraction, random_state=0)
    train_index, validation_index = next(splitter.split(articles, groups=articles))
    return [examples[i] for i in sorted(train_index)], [examples[i] for i in sorted(validation_index)]


def take_first(examples: list[Example], limit: int) -> list[Example]:
    """The first `limit` examples (0: all), deterministic so reruns see the same data."""
    return examples[:limit] if limit else examples


CANONICAL_COLUMNS = ("id", "title", "question", "context", "answers")


def canonical_row(example: Example) -> dict[str, Any]:
    return {key: example[key] for key in CANONICAL_COLUMNS}

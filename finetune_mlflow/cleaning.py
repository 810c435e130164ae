"""Pure data steps of `prepare`: normalize, dedupe, validate, split. No I/O, no MLflow.

Each is a generator over rows, so a million questions stream through without being held; what a step drops is
counted in a `Tally` (invalid rows also handed to a `drop` callback), so the step module can log every count;
nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

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


def normalize_examples(examples: Iterable[Example]) -> Iterator[Example]:
    shared: dict[str, str] = {}
    for example in examples:
        if len(shared) > _SHARED_TEXTS:  # bounded: shared texts come in runs (one paragraph's questions)
            shared.clear()
        yield normalize_example(example, shared)


_SHARED_TEXTS = 64  # texts held: a few paragraphs (their questions come together), not a file of contexts


def _add(digest: Any, text: str) -> None:
    """Hash a text length-prefixed, so no two lists of texts hash alike."""
    data = text.encode("utf-8", "surrogatepass")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _key(person: bytes, *texts: str) -> Any:
    """A 16-byte blake2b hash of texts; `person` keeps the kinds of key apart."""
    digest = hashlib.blake2b(digest_size=16, person=person)
    for text in texts:
        _add(digest, text)
    return digest


def content_keys(example: Example) -> tuple[bytes, bytes, bytes]:
    """Keys of the id, of (question, context) and of (question, context, answers): what deduplication remembers
    of a row instead of its texts (about 250 bytes a row, where the rows themselves are kilobytes)."""
    digest = _key(b"pair", example["question"], example["context"])
    pair = digest.digest()
    for answer in example["answers"]:
        _add(digest, answer)
    return _key(b"id", example["id"]).digest(), pair, digest.digest()


@dataclass
class Tally:
    """What the streaming steps saw and dropped of one input, complete once all its rows have been consumed."""
    n_raw: int = 0
    n_exact_duplicates: int = 0
    n_question_context_duplicates: int = 0
    n_invalid: int = 0

    @property
    def n_duplicates(self) -> int:
        return self.n_exact_duplicates + self.n_question_context_duplicates


def deduplicate(examples: Iterable[Example], path: str, tally: Tally,
                first_line: Callable[[str], int | None] = lambda example_id: None) -> Iterator[Example]:
    """Drop exact duplicates, then repeated (question, context) pairs (first wins); every row is counted.

    The same id with different content is not a duplicate but a conflict: it is refused, since either answer
    could be the wrong one; `first_line` finds the line of the id's first row for the message (the shell reads
    the input again: remembering every row's line would cost memory for every row, for a message).
    """
    content_of: dict[bytes, bytes] = {}  # id key or (question, context) key of a kept row -> content key
    for example in examples:
        tally.n_raw += 1
        id_key, pair, content = content_keys(example)
        if content_of.setdefault(id_key, content) != content:
            first = first_line(example["id"])
            raise DataError(path, example.get("source_line"),
                            f"id {example['id']!r} appears again with different content"
                            f"{f' (first at line {first})' if first else ''}; give each example a unique id")
        kept = content_of.setdefault(pair, content)
        if kept is content:
            yield example
        elif kept == content:
            tally.n_exact_duplicates += 1
        else:
            tally.n_question_context_duplicates += 1


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


def validate_examples(examples: Iterable[Example], path: str, *, extractive: bool, max_chars: int,
                      on_invalid: str, tally: Tally, drop: Callable[[dict[str, Any]], None]) -> Iterator[Example]:
    """The usable examples; an unusable one fails naming its line, or goes to `drop` as its file, line, id and
    reason (for the log and the `dropped.jsonl` artifact)."""
    for example in examples:
        problem = example_problem(example, extractive=extractive, max_chars=max_chars)
        if problem is None:
            yield example
        elif on_invalid == "fail":
            raise DataError(path, example.get("source_line"),
                            f"{problem} (id {example['id']!r}); fix the row or set data.on_invalid: drop")
        else:
            tally.n_invalid += 1
            drop({"file": path, "line": example.get("source_line"), "id": example["id"], "reason": problem})


def article_key(example: Example) -> str:
    """The article an example belongs to: its title or, untitled, a digest of its context (remembering every
    title costs little; remembering every context would cost the input's size)."""
    return example["title"] or "\x00" + _key(b"article", example["context"]).hexdigest()


def held_out_articles(articles: Iterable[str], validation_fraction: float) -> set[str]:
    """The validation articles: scikit-learn's GroupShuffleSplit with a fixed seed over the set of articles,
    which is what splitting every row by article gives (it depends on the set alone, not on rows or order)."""
    from sklearn.model_selection import GroupShuffleSplit  # imported here: only a split pays its import time

    unique = sorted(set(articles))
    if len(unique) < 2:
        return set()
    splitter = GroupShuffleSplit(n_splits=1, test_size=validation_fraction, random_state=0)
    _, validation_index = next(splitter.split(unique, groups=unique))
    return {unique[i] for i in validation_index}


CANONICAL_COLUMNS = ("id", "title", "question", "context", "answers")


def canonical_row(example: Example) -> dict[str, Any]:
    return {key: example[key] for key in CANONICAL_COLUMNS}

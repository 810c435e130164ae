"""Read QA data (SQuAD v1.1 JSON, JSONL, CSV) into flat example dicts that remember where each came from.

Parsing is strict about structure: anything that is not the expected shape is a DataError naming the file, the
line (or JSON path) and the reason. Row-level content problems (empty fields, answers missing from the context)
are left to `cleaning.validate_examples`, which can drop them under `on_invalid: drop`.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

from finetune_mlflow.errors import DataError

Example = dict[str, Any]
# A lone UTF-16 surrogate (`"\\ud800"` in JSON) decodes to a str that cannot be written back as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _loads(text: str, path: Path, line: int | None) -> Any:
    """json.loads with every way it can fail as a DataError naming the line (a 200,000-deep nest included)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = line if line is not None else e.lineno
        raise DataError(str(path), at, f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(str(path), line, "JSON nested too deeply to read (thousands of [ or { levels); "
                        "each example is a flat object") from None


def _check_text(values: list[Any], path: Path, line: int | None, where: str = "") -> None:
    """Refuse lone surrogates here, with the line, rather than as an encoding traceback when the row is written."""
    for value in values:
        found = _SURROGATE.search(value) if isinstance(value, str) else None
        if found:
            raise DataError(str(path), line, f"{where}text holds a lone UTF-16 surrogate "
                            f"({found.group().encode('unicode_escape').decode()}), which is not a character; "
                            "fix the \\u escape")


def answer_start_problem(answers: Any, context: str) -> str | None:
    """Why a SQuAD `answer_start` cannot be right (not an integer, or outside the context), or None."""
    for item in answers if isinstance(answers, list) else []:
        if not isinstance(item, dict) or "answer_start" not in item:
            continue
        start = item["answer_start"]
        if not isinstance(start, int) or isinstance(start, bool):
            return f"answer_start {start!r:.40} is not an integer"
        if not 0 <= start <= len(context) - len(str(item.get("text", ""))):
            return f"answer_start {start} is outside the context (0 to {len(context)} characters)"
    return None


def read_input_bytes(path: Path) -> bytes:
    """The bytes of an input file, or a DataError saying why they cannot be read (missing, a directory, no read
    permission, a symlink loop, ...)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), None, "file does not exist; pass -P train_data=<path or runs:/ URI>") from None
    except IsADirectoryError:
        raise DataError(str(path), None, "is a directory; pass a .json, .jsonl or .csv file") from None
    except PermissionError:
        raise DataError(str(path), None, "cannot be read: permission denied") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(str(path), None, "is a symbolic link loop") from None
        raise DataError(str(path), None, f"cannot be read: {e.strerror or e}") from None


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(str(path), line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "re-save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # a BOM is harmless; editors on Windows add one


def _as_answers(value: Any, path: Path, line: int | None, where: str = "") -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        answers = []
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                answers.append(item["text"])
            elif isinstance(item, str):
                answers.append(item)
            else:
                raise DataError(str(path), line, f"{where}answers must be strings or objects with a 'text' string, "
                                f"got {item!r:.80}")
        return answers
    if isinstance(value, dict) and isinstance(value.get("text"), list):  # Hugging Face squad layout
        return [str(text) for text in value["text"]]
    raise DataError(str(path), line, f"{where}answers must be a non-empty list (or 'answer' a string), got {value!r:.80}")


def _flat_record(obj: Any, path: Path, line: int) -> Example:
    if not isinstance(obj, dict):
        raise DataError(str(path), line, f"expected a JSON object per line, got {type(obj).__name__}")
    for key in ("question", "context"):
        if key not in obj:
            raise DataError(str(path), line, f"missing field {key!r}; each row needs question, context and answers")
        if not isinstance(obj[key], str):
            raise DataError(str(path), line, f"field {key!r} must be a string, got {type(obj[key]).__name__}")
    if "answers" in obj:
        answers = _as_answers(obj["answers"], path, line)
    elif "answer" in obj:
        answers = _as_answers(obj["answer"], path, line)
    else:
        raise DataError(str(path), line, "missing field 'answers' (a list) or 'answer' (a string)")
    _check_text([obj["question"], obj["context"], obj.get("id"), obj.get("title"), *answers], path, line)
    return {
        "id": str(obj.get("id") or f"{path.name}:{line}"),
        "title": str(obj.get("title") or ""),
        "question": obj["question"],
        "context": obj["context"],
        "answers": answers,
        "source_line": line,
    }


def _read_jsonl(path: Path, text: str) -> list[Example]:
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        examples.append(_flat_record(_loads(line, path, number), path, number))
    return examples


def _read_csv(path: Path, text: str) -> list[Example]:
    reader = csv.DictReader(io.StringIO(text))
    examples = []
    try:
        for row in reader:
            line = reader.line_num
            if "answers" in row and row["answers"] is not None:
                try:
                    row["answers"] = json.loads(row["answers"])
                except (json.JSONDecodeError, RecursionError):
                    row["answers"] = [row["answers"]]
            examples.append(_flat_record({k: v for k, v in row.items() if k is not None}, path, line))
    except csv.Error as e:  # e.g. a field over the reader's 131072-character limit
        raise DataError(str(path), reader.line_num + 1, f"unreadable CSV ({e}); long contexts belong in JSONL") \
            from None
    return examples


_ID_FIELD = re.compile(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _id_lines(text: str) -> dict[str, int]:
    """Line of every question id in one pass, so errors in a SQuAD JSON file can name a line."""
    lines, position, line = {}, 0, 1
    for match in _ID_FIELD.finditer(text):
        line += text.count("\n", position, match.start())
        position = match.start()
        lines.setdefault(match.group(1), line)
    return lines


def _first_id_line(paragraph: Any, id_lines: dict[str, int]) -> int | None:
    """Line of the first question id inside a malformed paragraph or question, when it has one."""
    qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
    for qa in qas if isinstance(qas, list) else []:
        if isinstance(qa, dict) and isinstance(qa.get("id"), str) and qa["id"] in id_lines:
            return id_lines[qa["id"]]
    return None


def _read_squad_json(path: Path, text: str) -> list[Example]:
    document = _loads(text, path, None)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(str(path), 1, "expected a SQuAD v1.1 object {\"version\", \"data\": [articles]}, got "
                        f"{type(document).__name__}")
    id_lines = _id_lines(text)
    examples = []
    for a, article in enumerate(document["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(str(path), None, f"data[{a}] must be an object with a 'paragraphs' list")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str) \
                    or not isinstance(paragraph.get("qas"), list):
                raise DataError(str(path), _first_id_line(paragraph, id_lines),
                                f"{where} must have a 'context' string and a 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                qa_where = f"{where}.qas[{q}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "id" not in qa:
                    raise DataError(str(path), _first_id_line({"qas": [qa]}, id_lines),
                                    f"{qa_where} must have 'id' and a 'question' string")
                line = id_lines.get(str(qa["id"]))
                answers = _as_answers(qa.get("answers"), path, line, f"{qa_where}: ")
                _check_text([qa["question"], paragraph["context"], article.get("title"), *answers], path, line,
                            f"{qa_where}: ")
                examples.append({
                    "id": str(qa["id"]),
                    "title": str(article.get("title", "")),
                    "question": qa["question"],
                    "context": paragraph["context"],
                    "answers": answers,
                    "source_line": line,
                    # Left to cleaning.validate_examples, which fails or drops the row per data.on_invalid.
                    "answer_problem": answer_start_problem(qa.get("answers"), paragraph["context"]),
                })
    return examples


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a local file, format chosen by content: SQuAD JSON object, else JSONL, or CSV by suffix."""
    path = Path(path)
    text = _decode(path, read_input_bytes(path))
    if not text.strip():
        raise DataError(str(path), None, "file is empty; expected SQuAD JSON, JSONL or CSV examples")
    if path.suffix.lower() == ".csv":
        return _read_csv(path, text)
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{\"version\"") or (
        text.lstrip().startswith("{") and "\n" not in text.strip() and "\"data\"" in text[:200]
    ):
        return _read_squad_json(path, text)
    if text.lstrip().startswith("["):
        raise DataError(str(path), 1, "a JSON array is not supported; use a SQuAD v1.1 object or one JSON object "
                        "per line (JSONL)")
    return _read_jsonl(path, text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file this project wrote (blank lines skipped); input data goes through `read_examples`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One row at a time (`rows` may be a generator), so no file's text is held in memory whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

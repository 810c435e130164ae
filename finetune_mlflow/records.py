"""Read QA data (SQuAD v1.1 JSON, JSONL, CSV) into flat example dicts that remember where each came from.

Parsing is strict about structure: anything that is not the expected shape is a DataError naming the file, the
line (or JSON path) and the reason. Row-level content problems (empty fields, answers missing from the context)
are left to `cleaning.validate_examples`, which can drop them under `on_invalid: drop`.

Files stream: JSONL and CSV a line at a time, a SQuAD object an article at a time (decoded from a sliding window
over its text, which keeps count of lines), so memory follows the block size and the largest article, not the
file; an error deep in a file names the same line (and column) as reading it whole would.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn, TextIO

from finetune_mlflow.errors import DataError

Example = dict[str, Any]
# A lone UTF-16 surrogate (`"\\ud800"` in JSON) decodes to a str that cannot be written back as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _malformed(path: Path, line: int | None, message: str, column: int) -> DataError:
    return DataError(str(path), line, f"malformed JSON ({message} at column {column})")


def _too_deep(path: Path, line: int | None) -> DataError:
    return DataError(str(path), line, "JSON nested too deeply to read (thousands of [ or { levels); "
                     "each example is a flat object")


def _loads(text: str, path: Path, line: int | None) -> Any:
    """json.loads with every way it can fail as a DataError naming the line (a 200,000-deep nest included)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _malformed(path, line if line is not None else e.lineno, e.msg, e.colno) from None
    except RecursionError:
        raise _too_deep(path, line) from None


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


BLOCK = 1 << 20  # characters or bytes read at a time: memory is bounded by this and the largest article


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Any way an input file cannot be opened or read as a DataError saying why (missing, a directory, no read
    permission, a symlink loop, ...)."""
    try:
        yield
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


def input_blocks(path: Path) -> Iterator[bytes]:
    """The bytes of an input file a block at a time (hashing or reading it never holds the whole file)."""
    with _readable(path), path.open("rb") as handle:
        while block := handle.read(BLOCK):
            yield block


def _not_utf8(path: Path, data: bytes, start: int, offset: int, line: int) -> DataError:
    """The error for `data[start]`, where `data` begins at byte `offset` and on `line` of the file."""
    return DataError(str(path), line + data.count(b"\n", 0, start),
                     f"not valid UTF-8 (byte 0x{data[start]:02x} at offset {offset + start}); "
                     "re-save the file as UTF-8")


def _text_blocks(path: Path) -> Iterator[str]:
    """The file's text a block at a time (a character cut by a block's end completed from the next), the BOM
    dropped; invalid UTF-8 is a DataError naming its line, as for a file read whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, first = 0, 1, True
    for block in itertools.chain(input_blocks(path), [b""]):
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e.object, e.start, offset - pending, line) from None
        offset, line = offset + len(block), line + block.count(b"\n")
        if first and text:
            text, first = text.removeprefix("\ufeff"), False  # a BOM is harmless; editors on Windows add one
        yield text


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of every line (split on \\n, the line break kept), decoded one at a time."""
    with _readable(path), path.open("rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, raw, e.start, offset, number) from None
            offset += len(raw)
            yield number, text.removeprefix("\ufeff") if number == 1 else text


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


def _jsonl_examples(path: Path) -> Iterator[Example]:
    for number, line in _text_lines(path):
        if line.strip():
            yield _flat_record(_loads(line.rstrip("\r\n"), path, number), path, number)


def _csv_examples(path: Path) -> Iterator[Example]:
    reader = csv.DictReader(text for _, text in _text_lines(path))
    try:
        for row in reader:
            line = reader.line_num
            if "answers" in row and row["answers"] is not None:
                try:
                    row["answers"] = json.loads(row["answers"])
                except (json.JSONDecodeError, RecursionError):
                    row["answers"] = [row["answers"]]
            yield _flat_record({k: v for k, v in row.items() if k is not None}, path, line)
    except csv.Error as e:  # e.g. a field over the reader's 131072-character limit
        raise DataError(str(path), reader.line_num + 1, f"unreadable CSV ({e}); long contexts belong in JSONL") \
            from None


_ID_FIELD = re.compile(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"')
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_SLACK = 64  # a decoding error this close to the window's end may only mean the value goes on past it
_NOT_SQUAD = "expected a SQuAD v1.1 object {\"version\", \"data\": [articles]}, got "


class _Window:
    """A file's text seen through a sliding window: blocks appended as the parser needs them, the text it has
    consumed dropped, and the line and column where the window starts kept, so that a line can be named for any
    position however deep in the file (a SQuAD file is often one line of hundreds of megabytes)."""

    def __init__(self, path: Path):
        self.path, self.blocks = path, _text_blocks(path)
        self.text, self.pos, self.eof = "", 0, False
        self.line, self.column = 1, 0  # where text[0] is in the file (the column counts from 0)
        self._mark, self._mark_line = 0, 1  # a position already counted up to, and its line

    def line_at(self, position: int) -> int:
        """Line of text[position]; positions asked for never decrease, so counting resumes where it stopped."""
        self._mark_line += self.text.count("\n", self._mark, position)
        self._mark = position
        return self._mark_line

    def extend(self) -> bool:
        """Drop the consumed text and read at least as much again as is left (at least a block), so a value
        longer than a block is decoded a logarithmic number of times, not once per block; False at the end."""
        newline = self.text.rfind("\n", 0, self.pos)
        self.column = self.pos - newline - 1 if newline >= 0 else self.column + self.pos
        self.line = self.line_at(self.pos)
        parts, size = [self.text[self.pos:]], 0
        while not self.eof and size < max(len(parts[0]), 1):
            block = next(self.blocks, None)
            self.eof = block is None
            parts.append(block or "")
            size += len(block or "")
        self.text, self.pos, self._mark, self._mark_line = "".join(parts), 0, 0, self.line
        return size > 0

    def malformed(self, message: str, position: int) -> DataError:
        """The DataError for malformed JSON at `position`, with the file's line and column."""
        e = json.JSONDecodeError(message, self.text, position)
        return _malformed(self.path, self.line + e.lineno - 1, e.msg, e.colno + (self.column if e.lineno == 1 else 0))

    def next_char(self) -> str:
        """The next character that is not JSON whitespace ('' at the end of the file), `pos` left on it."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.extend():
                return ""

    def expect(self, chars: str, message: str) -> str:
        """Step over the next character, one of `chars`, or fail with json's own message for what is there."""
        char = self.next_char()
        if not char or char not in chars:
            raise self.malformed(message, self.pos)
        self.pos += 1
        return char

    def value(self) -> tuple[Any, int]:
        """The JSON value at the next character and where it starts, reading on while it may be cut off."""
        self.next_char()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:  # a number that ends the window may go on past it
                    start, self.pos = self.pos, end
                    return value, start
            except json.JSONDecodeError as e:
                if self.eof or (not e.msg.startswith("Unterminated string") and e.pos + _SLACK < len(self.text)):
                    raise self.malformed(e.msg, e.pos) from None
            except RecursionError:
                raise _too_deep(self.path, None) from None
            self.extend()


def _squad_articles(path: Path) -> Iterator[tuple[str, Any, int, dict[str, int]]]:
    """(`data[i]`, the article, its line, the line of each question id in it) for the articles of a SQuAD object,
    decoded one at a time; the object's other members (`version`) are checked as JSON and skipped."""
    window = _Window(path)
    if window.next_char() != "{":
        _refuse_document(path)
    window.pos += 1
    has_data, closed = False, window.next_char() == "}"
    window.pos += closed  # an empty object: no data
    while not closed:
        if window.next_char() != '"':
            raise window.malformed("Expecting property name enclosed in double quotes", window.pos)
        key, start = window.value()
        if key == "data" and has_data:  # json.loads would keep the last one; streaming cannot
            raise DataError(str(path), window.line_at(start), "a second 'data' member; a SQuAD object has one")
        window.expect(":", "Expecting ':' delimiter")
        if key == "data":
            has_data = True
            yield from _data_array(window)
        else:
            window.value()
        closed = window.expect(",}", "Expecting ',' delimiter") == "}"
    if window.next_char():
        raise window.malformed("Extra data", window.pos)
    if not has_data:
        raise DataError(str(path), 1, _NOT_SQUAD + "dict")


def _data_array(window: _Window) -> Iterator[tuple[str, Any, int, dict[str, int]]]:
    if window.next_char() != "[":
        raise DataError(str(window.path), 1, _NOT_SQUAD + "dict")
    window.pos += 1
    if window.next_char() == "]":
        window.pos += 1
        return
    for index in itertools.count():
        article, start = window.value()
        line, id_lines = window.line_at(start), {}
        for match in _ID_FIELD.finditer(window.text, start, window.pos):
            id_lines.setdefault(match.group(1), window.line_at(match.start()))
        yield f"data[{index}]", article, line, id_lines
        if window.expect(",]", "Expecting ',' delimiter") == "]":
            return


def _refuse_document(path: Path) -> NoReturn:
    """A document that is not a JSON object, read whole to say what it is instead (malformed, or its type)."""
    document = _loads("".join(_text_blocks(path)), path, None)
    raise DataError(str(path), 1, _NOT_SQUAD + type(document).__name__)


def _first_id_line(paragraph: Any, id_lines: dict[str, int]) -> int | None:
    """Line of the first question id inside a malformed paragraph or question, when it has one."""
    qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
    for qa in qas if isinstance(qas, list) else []:
        if isinstance(qa, dict) and isinstance(qa.get("id"), str) and qa["id"] in id_lines:
            return id_lines[qa["id"]]
    return None


def _squad_examples(path: Path) -> Iterator[Example]:
    for where, article, line, id_lines in _squad_articles(path):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(str(path), line, f"{where} must be an object with a 'paragraphs' list")
        for p, paragraph in enumerate(article["paragraphs"]):
            yield from _paragraph_examples(path, f"{where}.paragraphs[{p}]", article, paragraph, id_lines)


def _paragraph_examples(path: Path, where: str, article: dict, paragraph: Any,
                        id_lines: dict[str, int]) -> Iterator[Example]:
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
        yield {
            "id": str(qa["id"]),
            "title": str(article.get("title", "")),
            "question": qa["question"],
            "context": paragraph["context"],
            "answers": answers,
            "source_line": line,
            # Left to cleaning.validate_examples, which fails or drops the row per data.on_invalid.
            "answer_problem": answer_start_problem(qa.get("answers"), paragraph["context"]),
        }


def _leading_text(path: Path) -> str:
    """The first block's text from its first non-whitespace character ('' when the whole file is whitespace):
    enough to tell the format."""
    for number, block in enumerate(input_blocks(path)):
        text = block.decode("utf-8", errors="replace")
        text = (text.removeprefix("\ufeff") if number == 0 else text).lstrip()
        if text:
            return text
    return ""


def _one_line(path: Path) -> bool:
    """Whether nothing but whitespace follows the first line break after the text starts: one JSON object on
    one line is a SQuAD file, several lines are JSONL."""
    started = broken = False
    for block in input_blocks(path):
        if not started:
            block = block.lstrip()
            started = bool(block)
        if started and not broken and (at := block.find(b"\n")) >= 0:
            broken, block = True, block[at:]
        if broken and block.strip():
            return False
    return True


def read_examples(path: str | Path) -> Iterator[Example]:
    """Examples from a local file a row at a time, format chosen by content: SQuAD JSON object, else JSONL, or
    CSV by suffix. Problems with the file as a whole are raised here; those of a row when it is reached."""
    path = Path(path)
    head = _leading_text(path)
    if not head:
        raise DataError(str(path), None, "file is empty; expected SQuAD JSON, JSONL or CSV examples")
    if path.suffix.lower() == ".csv":
        return _csv_examples(path)
    if path.suffix.lower() == ".json" or head.startswith("{\"version\"") or (
        head.startswith("{") and "\"data\"" in head[:200] and _one_line(path)
    ):
        return _squad_examples(path)
    if head.startswith("["):
        raise DataError(str(path), 1, "a JSON array is not supported; use a SQuAD v1.1 object or one JSON object "
                        "per line (JSONL)")
    return _jsonl_examples(path)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file this project wrote, one at a time (blank lines skipped); input data goes through
    `read_examples`."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


_ENCODER = json.JSONEncoder(ensure_ascii=False)  # one, not one per row as `json.dumps(ensure_ascii=False)` builds


def jsonl_line(row: dict[str, Any]) -> str:
    return _ENCODER.encode(row) + "\n"


def open_jsonl(path: Path) -> TextIO:
    """A JSONL file to write rows to one at a time (its folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One row at a time (`rows` may be a generator), so no file's text is held in memory whole."""
    with open_jsonl(path) as handle:
        for row in rows:
            handle.write(jsonl_line(row))


def jsonl_objects(text: str, path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) of every line of a provider-format JSONL text; a blank line or one that
    is not JSON is a DataError naming the file and line (what a tuning service would reject after the upload)."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise DataError(path, line_no, "blank line; every line must be one JSON object")
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})") from None

"""Streaming prepare: the SQuAD reader's sliding window gives the rows and lines of a whole-file read whatever
the block size, an error deep in a big file still names its line (and column), and memory follows the rows'
count, not the input's size."""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from finetune_mlflow import records
from finetune_mlflow.config import load_config
from finetune_mlflow.errors import DataError
from finetune_mlflow.preparation import write_splits
from finetune_mlflow.records import read_examples
from finetune_mlflow.stats import counted_percentiles
from tests.conftest import SQUAD_TRAIN, squad_subset
from tests.test_bad_input import VALID

# Multi-byte characters, so that block boundaries also cut UTF-8 sequences.
UNICODE_ARTICLE = {"title": "Zürich", "paragraphs": [{"context": "東京 and Zürich — naïve café.", "qas": [
    {"id": "u1", "question": "Which city is Swiss?", "answers": [{"text": "Zürich", "answer_start": 7}]}]}]}


def squad_text(indent: int | None) -> str:
    document = squad_subset(SQUAD_TRAIN, 6, 20)
    document["data"].insert(3, UNICODE_ARTICLE)
    return json.dumps(document, indent=indent, ensure_ascii=False)


def id_line(text: str, example_id: str) -> int:
    return text[: text.index(f'"id": "{example_id}"')].count("\n") + 1


@pytest.mark.parametrize("indent", [None, 1], ids=["one-line", "indented"])
def test_rows_and_lines_do_not_depend_on_where_blocks_end(tmp_path, monkeypatch, indent):
    text = squad_text(indent)
    path = tmp_path / "squad.json"
    path.write_text(text, encoding="utf-8")
    whole = list(read_examples(path))  # the file is smaller than a block: read in one piece
    assert len(whole) == 121 and [e["source_line"] for e in whole] == [id_line(text, e["id"]) for e in whole]
    for block in (7, 64, 1000):  # every article (and some characters) cut by block boundaries
        monkeypatch.setattr(records, "BLOCK", block)
        assert list(read_examples(path)) == whole


def edits(text: str) -> dict[str, str]:
    last = text.rindex('"answer_start"')
    colon = text.index(":", last)
    return {"missing-colon": text[:colon] + text[colon + 1:], "truncated": text[: last + 5],
            "extra-data": text + ' {"more": 1}'}


@pytest.mark.parametrize("indent", [None, 1], ids=["one-line", "indented"])
@pytest.mark.parametrize("edit", ["missing-colon", "truncated", "extra-data"])
def test_malformed_json_deep_in_a_file_names_the_line_and_column_a_whole_read_would(tmp_path, monkeypatch,
                                                                                  indent, edit):
    broken = edits(squad_text(indent))[edit]
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(broken)
    path = tmp_path / "broken.json"
    path.write_text(broken, encoding="utf-8")
    monkeypatch.setattr(records, "BLOCK", 256)  # the error is hundreds of windows into the file
    with pytest.raises(DataError) as raised:
        list(read_examples(path))
    assert raised.value.line == whole.value.lineno
    assert raised.value.reason == f"malformed JSON ({whole.value.msg} at column {whole.value.colno})"


def test_invalid_utf8_deep_in_a_file_names_its_line_and_offset(tmp_path, monkeypatch):
    raw = squad_text(1).encode("utf-8")
    at = raw.rindex(b'"question"') + 3
    path = tmp_path / "latin1.json"
    path.write_bytes(raw[:at] + b"\xe9" + raw[at:])
    monkeypatch.setattr(records, "BLOCK", 256)
    with pytest.raises(DataError, match=rf"not valid UTF-8 \(byte 0xe9 at offset {at}\)") as raised:
        list(read_examples(path))
    assert raised.value.line == raw[:at].count(b"\n") + 1


def test_an_id_conflict_names_the_line_of_the_ids_first_row(tmp_path):
    rows = [{"id": f"q{n}", "question": f"Which city {n}?", "context": "Warsaw is the capital.",
             "answers": ["Warsaw"]} for n in range(50)]
    rows.append({**rows[7], "question": "Another question?"})
    path = tmp_path / "conflict.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = load_config(None, {"train_data": str(path), "validation_data": str(VALID)})
    with pytest.raises(DataError, match=r"conflict\.jsonl:51: id 'q7' appears again with different content "
                                        r"\(first at line 8\)"):
        write_splits(config, tmp_path / "prepared")


def big_rows(path: Path, n: int) -> Path:
    """`n` rows with distinct 6,000-character contexts: many bytes of input per row."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            context = f"Row {i} is about Warsaw. " + "filler words " * 460
            handle.write(json.dumps({"id": f"r{i}", "title": f"T{i // 50}", "question": f"What is row {i} about?",
                                     "context": context, "answers": ["Warsaw"]}) + "\n")
    return path


def test_memory_follows_the_row_count_not_the_input_size(tmp_path):
    """Four times the input costs only the deduplication keys (a few hundred bytes a row), not the rows: the
    peak grows by well under a tenth of what the input grows by (measured: 2.2 MB at both sizes, for 3 and 12 MB
    of input)."""
    peaks, sizes = [], []
    for n, traced in ((500, False), (500, True), (2000, True)):  # the first run imports what a split needs
        path = big_rows(tmp_path / f"rows-{n}.jsonl", n)
        config = load_config(None, {"train_data": str(path)})
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, validation_data=""))
        if traced:
            tracemalloc.start()
        counts, _ = write_splits(config, tmp_path / f"prepared-{n}-{traced}")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sizes.append(path.stat().st_size)
        assert counts["n_train"] + counts["n_val"] == n
    assert peaks[2] - peaks[1] < (sizes[2] - sizes[1]) / 10, (peaks, sizes)
    assert peaks[2] < sizes[2] / 2, (peaks, sizes)


def test_percentiles_of_a_length_histogram_are_numpys_to_the_bit():
    """Token statistics come from a histogram of lengths (bounded), yet equal np.percentile over every row."""
    rng = random.Random(0)
    for _ in range(300):
        values = [rng.randint(0, rng.choice([3, 50, 1000])) for _ in range(rng.randint(1, 400))]
        percents = [50, 95, rng.uniform(0, 100)]
        assert counted_percentiles(collections.Counter(values), percents) == \
            [float(x) for x in np.percentile(values, percents)]

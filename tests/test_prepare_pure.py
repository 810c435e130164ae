"""The pure data steps of prepare: reading, normalizing, deduplicating, validating, splitting, converting."""

from __future__ import annotations

import json

import pytest

from finetune_mlflow import cleaning
from finetune_mlflow.errors import DataError
from finetune_mlflow.providers import PROVIDERS, training_records
from finetune_mlflow.providers.openai.data import to_openai_chat
from finetune_mlflow.providers.vertex.data import to_gemini
from finetune_mlflow.prompt import SYSTEM_INSTRUCTION, clean_completion, user_prompt
from finetune_mlflow.records import read_examples
from tests.conftest import SQUAD_TRAIN


def example(**fields):
    base = {"id": "q1", "title": "T", "question": "Who?", "context": "Ada wrote it.", "answers": ["Ada"],
            "source_line": 1}
    return {**base, **fields}


def test_reads_squad_json_with_lines_for_every_question():
    examples = read_examples(SQUAD_TRAIN)
    assert len(examples) == 8580
    assert all(e["source_line"] for e in examples)
    first = examples[0]
    assert first["title"] == "Super_Bowl_50" and first["answers"]


def test_reads_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"question": "Who?", "context": "Ada wrote it.", "answer": "Ada"}\n\n'
                     '{"question": "What?", "context": "A poem.", "answers": ["A poem"]}\n', encoding="utf-8")
    rows = read_examples(jsonl)
    assert [r["answers"] for r in rows] == [["Ada"], ["A poem"]]
    assert [r["source_line"] for r in rows] == [1, 3]
    csv = tmp_path / "d.csv"
    csv.write_text('question,context,answers\nWho?,Ada wrote it.,"[""Ada""]"\n', encoding="utf-8")
    assert read_examples(csv)[0]["answers"] == ["Ada"]


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "Who?", "context": "Ada.", "answer": "Ada"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        read_examples(path)


def test_normalize_is_nfc_and_collapses_whitespace():
    decomposed = "Cafe\u0301  au\tlait\n"
    assert cleaning.normalize_text(decomposed) == "Caf\u00e9 au lait"


def test_deduplicate_drops_exact_and_question_context_duplicates():
    rows = [example(), example(id="q2"), example(id="q3", answers=["Ada wrote"]), example(id="q4", question="X?")]
    result = cleaning.deduplicate(rows, "f")
    assert [r["id"] for r in result.examples] == ["q1", "q4"]
    assert (result.n_exact_duplicates, result.n_question_context_duplicates) == (1, 1)


def test_same_id_with_different_content_is_refused():
    with pytest.raises(DataError, match="appears again with different content"):
        cleaning.deduplicate([example(), example(question="Other?", source_line=7)], "f")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"question": ""}, "empty question"),
        ({"context": ""}, "empty context"),
        ({"answers": [""]}, "empty answer"),
        ({"answers": ["Bob"]}, "does not occur in the context"),
        ({"context": "x" * 50 + " Ada"}, "over data.max_example_chars=40"),
    ],
)
def test_invalid_rows_fail_with_line_or_are_dropped_and_counted(fields, problem):
    rows = [example(**fields, source_line=3), example(id="ok", question="Which?")]
    with pytest.raises(DataError, match=rf"f:3: .*{problem}"):
        cleaning.validate_examples(rows, "f", extractive=True, max_chars=40, on_invalid="fail")
    kept = cleaning.validate_examples(rows, "f", extractive=True, max_chars=40, on_invalid="drop")
    assert [r["id"] for r in kept.examples] == ["ok"]
    assert kept.dropped[0]["line"] == 3 and problem.split()[0] in kept.dropped[0]["reason"]


def test_split_by_article_is_deterministic_and_disjoint():
    rows = [example(id=f"{t}{i}", title=f"article-{t}") for t in range(10) for i in range(5)]
    train, validation = cleaning.split_by_article(rows, 0.2)
    assert {r["title"] for r in train}.isdisjoint({r["title"] for r in validation})
    assert len(validation) == 10 and len(train) == 40
    assert cleaning.split_by_article(list(reversed(rows)), 0.2)[1] != [] and \
        {r["title"] for r in cleaning.split_by_article(list(reversed(rows)), 0.2)[1]} == {r["title"] for r in validation}


def test_provider_formats_share_one_prompt():
    row = example()
    chat = to_openai_chat(row)["messages"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant"]
    assert chat[0]["content"] == SYSTEM_INSTRUCTION and chat[1]["content"] == user_prompt("Who?", "Ada wrote it.")
    gemini = to_gemini(row)
    assert [c["role"] for c in gemini["contents"]] == ["user", "model"]
    assert gemini["contents"][1]["parts"] == [{"text": "Ada"}]
    assert gemini["systemInstruction"]["parts"][0]["text"] == SYSTEM_INSTRUCTION
    # Each provider with a record format of its own writes it to prepared/<provider name>/.
    records = training_records()
    assert records["openai"] is to_openai_chat and records["vertex"] is to_gemini and set(records) == {
        "openai", "vertex", "transformers"}
    assert records["transformers"](row) == to_openai_chat(row)  # the same conversation, in its own folder
    assert set(training_records()) <= set(PROVIDERS)
    json.dumps([to_openai_chat(row), gemini])


def test_clean_completion_keeps_the_answer_line():
    assert clean_completion(' "Ada"\nbecause...') == "Ada"
    assert clean_completion(None) == "" and clean_completion("   ") == ""

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
    examples = list(read_examples(SQUAD_TRAIN))
    assert len(examples) == 8580
    assert all(e["source_line"] for e in examples)
    first = examples[0]
    assert first["title"] == "Super_Bowl_50" and first["answers"]


def test_reads_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"question": "Who?", "context": "Ada wrote it.", "answer": "Ada"}\n\n'
                     '{"question": "What?", "context": "A poem.", "answers": ["A poem"]}\n', encoding="utf-8")
    rows = list(read_examples(jsonl))
    assert [r["answers"] for r in rows] == [["Ada"], ["A poem"]]
    assert [r["source_line"] for r in rows] == [1, 3]
    csv = tmp_path / "d.csv"
    csv.write_text('question,context,answers\nWho?,Ada wrote it.,"[""Ada""]"\n', encoding="utf-8")
    assert next(read_examples(csv))["answers"] == ["Ada"]


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "Who?", "context": "Ada.", "answer": "Ada"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        list(read_examples(path))


def test_normalize_is_nfc_and_collapses_whitespace():
    decomposed = "Cafe\u0301  au\tlait\n"
    assert cleaning.normalize_text(decomposed) == "Caf\u00e9 au lait"


def test_deduplicate_drops_exact_and_question_context_duplicates():
    rows = [example(), example(id="q2"), example(id="q3", answers=["Ada wrote"]), example(id="q4", question="X?")]
    tally = cleaning.Tally()
    assert [r["id"] for r in cleaning.deduplicate(rows, "f", tally)] == ["q1", "q4"]
    assert (tally.n_raw, tally.n_exact_duplicates, tally.n_question_context_duplicates) == (4, 1, 1)


def test_same_id_with_different_content_is_refused():
    with pytest.raises(DataError, match="appears again with different content"):
        list(cleaning.deduplicate([example(), example(question="Other?", source_line=7)], "f", cleaning.Tally()))


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
    tally, dropped = cleaning.Tally(), []
    with pytest.raises(DataError, match=rf"f:3: .*{problem}"):
        list(cleaning.validate_examples(rows, "f", extractive=True, max_chars=40, on_invalid="fail", tally=tally,
                                        drop=dropped.append))
    kept = cleaning.validate_examples(rows, "f", extractive=True, max_chars=40, on_invalid="drop", tally=tally,
                                      drop=dropped.append)
    assert [r["id"] for r in kept] == ["ok"]
    assert dropped[0]["line"] == 3 and problem.split()[0] in dropped[0]["reason"] and tally.n_invalid == 1


def test_held_out_articles_are_the_row_level_group_split():
    """The held-out articles are GroupShuffleSplit's over every row (what prepare did when it held the rows),
    whatever the order, so streaming kept the split."""
    from sklearn.model_selection import GroupShuffleSplit

    rows = [example(id=f"{t}{i}", title=f"article-{t}") for t in range(10) for i in range(t % 3 + 1)]
    held_out = cleaning.held_out_articles((cleaning.article_key(r) for r in rows), 0.2)
    titles = [r["title"] for r in rows]
    _, index = next(GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=0).split(titles, groups=titles))
    assert held_out == {titles[i] for i in index} and len(held_out) == 2
    assert cleaning.held_out_articles(reversed(titles), 0.2) == held_out
    assert cleaning.held_out_articles(["one"] * 5, 0.2) == set()  # one article cannot be split


def test_untitled_rows_are_grouped_by_context():
    rows = [example(id=f"{c}{i}", title="", context=f"Ada wrote poem {c}.") for c in range(10) for i in range(3)]
    keys = {cleaning.article_key(r) for r in rows}
    assert len(keys) == 10 and all(len(key) < 40 for key in keys)  # a digest, not the context
    assert len(cleaning.held_out_articles(keys, 0.2)) == 2


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
        "openai", "vertex", "transformers", "together"}
    assert records["transformers"](row) == to_openai_chat(row)  # the same conversation, in its own folder
    assert records["together"](row) == to_openai_chat(row)
    assert set(training_records()) <= set(PROVIDERS)
    json.dumps([to_openai_chat(row), gemini])


def test_clean_completion_keeps_the_answer_line():
    assert clean_completion(' "Ada"\nbecause...') == "Ada"
    assert clean_completion(None) == "" and clean_completion("   ") == ""

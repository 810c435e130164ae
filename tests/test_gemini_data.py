from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_mlflow.config import load_config
from finetune_mlflow.providers.vertex import data as gemini_data
from finetune_mlflow.costing import approx_tokens, billed_tokens, estimate_cost_usd
from finetune_mlflow.errors import DataError
from finetune_mlflow.providers.vertex.data import to_gemini

EXAMPLE = {"question": "Who won?", "context": "The Broncos won the game.", "answers": ["The Broncos"]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_prepared_record_is_valid_and_tokens_are_four_chars_each():
    record = to_gemini(EXAMPLE)
    texts = [record["systemInstruction"]["parts"][0]["text"]] + [c["parts"][0]["text"] for c in record["contents"]]
    expected = sum(-(-len(t) // 4) for t in texts)
    assert gemini_data.example_tokens(record) == expected
    assert approx_tokens("abcd") == 1
    assert approx_tokens("abcde") == 2


def test_read_dataset_counts_examples_and_tokens(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [to_gemini(EXAMPLE)] * 3)
    stats = gemini_data.read_dataset(path)
    one = gemini_data.example_tokens(to_gemini(EXAMPLE))
    assert (stats.n_examples, stats.total_tokens, stats.max_example_tokens) == (3, 3 * one, one)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("{not json", "not valid JSON"),
        ({"contents": []}, "non-empty list"),
        ({"contents": [{"role": "model", "parts": [{"text": "a"}]}]}, "alternate"),
        ({"contents": [{"role": "user", "parts": [{"text": "q"}]}]}, "last turn"),
        ({"contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "  "}]}]},
         "contents[1].parts[0].text is empty"),
        ({"contents": [{"role": "user", "parts": []}, {"role": "model", "parts": [{"text": "a"}]}]},
         "contents[0].parts must be a non-empty list"),
        ({"contents": [{"role": "assistant", "parts": [{"text": "q"}]}]}, "expected \"user\" or \"model\""),
        ({"messages": []}, "unexpected key 'messages'"),
        ({"systemInstruction": {"parts": [{"text": ""}]}, "contents": []}, "systemInstruction.parts[0].text is empty"),
        ({"contents": [{"role": "user", "parts": [{"inlineData": {}}]}, {"role": "model", "parts": [{"text": "a"}]}]},
         "has no \"text\""),
        ("", "empty line"),
    ],
)
def test_invalid_record_names_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [to_gemini(EXAMPLE), bad, to_gemini(EXAMPLE)])
    with pytest.raises(DataError) as info:
        gemini_data.read_dataset(path)
    assert info.value.line == 2
    assert info.value.path == str(path)
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}:2: ")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        gemini_data.read_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        gemini_data.read_dataset(write_jsonl(tmp_path / "empty.jsonl", []))


def test_example_above_token_limit_is_refused_with_its_line(tmp_path):
    long = dict(EXAMPLE, context="word " * 400)
    path = write_jsonl(tmp_path / "train.jsonl", [to_gemini(EXAMPLE), to_gemini(EXAMPLE), to_gemini(long)])
    with pytest.raises(DataError) as info:
        gemini_data.read_dataset(path, max_example_tokens=200)
    assert info.value.line == 3
    assert "vertex.max_example_tokens" in info.value.reason


def test_validation_set_size_limit(tmp_path):
    stats = gemini_data.read_dataset(write_jsonl(tmp_path / "validation.jsonl", [to_gemini(EXAMPLE)] * 4))
    gemini_data.check_validation_size(stats, 4)
    gemini_data.check_validation_size(stats, 0)  # 0: no limit
    with pytest.raises(DataError, match="vertex.max_validation_examples"):
        gemini_data.check_validation_size(stats, 3)


def test_billable_tokens_and_cost():
    assert billed_tokens(1000, 3) == 3000
    # The experiment YAML's dated table, exact names only: a tunable sibling or a snapshot is not priced as its
    # family (gemini-2.5-flash-lite is several times cheaper than gemini-2.5-flash).
    prices = load_config("experiments/squad_gemini_flash.yaml").vertex.training_price_per_million_tokens
    assert gemini_data.price_per_million("gemini-2.5-flash", prices) == prices["gemini-2.5-flash"]
    assert gemini_data.price_per_million("publishers/google/models/gemini-2.5-flash", prices) == \
        prices["gemini-2.5-flash"]
    assert gemini_data.price_per_million("gemini-2.5-flash-lite", {"gemini-2.5-flash": 5.0}) is None
    assert gemini_data.price_per_million("gemini-2.5-flash-001", {"gemini-2.5-flash": 5.0}) is None
    assert gemini_data.price_per_million("gemini-2.5-flash-001", {"gemini-2.5-flash-001": 7.5}) == 7.5
    assert gemini_data.price_per_million("unknown-model", prices) is None
    assert gemini_data.price_per_million("gemini-2.5-flash") is None  # no table, no price: none in code

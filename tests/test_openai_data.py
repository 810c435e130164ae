"""Pure OpenAI data helpers: chat JSONL validation, token/cost estimates, result-file parsing."""

from __future__ import annotations

import base64
import json

import pytest

from finetune_mlflow.config import load_config
from finetune_mlflow.providers.openai import data as openai_data
from finetune_mlflow.costing import billed_tokens, estimate_cost_usd
from finetune_mlflow.errors import DataError
from finetune_mlflow.providers.openai.data import to_openai_chat
from finetune_mlflow.providers.base import MetricPoint


def example(i: int = 0) -> dict:
    return to_openai_chat({"question": f"Who wrote book {i}?", "context": f"Book {i} was written by Ann.",
                           "answers": ["Ann"]})


def jsonl(records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def test_valid_file_loads(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl(example(i) for i in range(12)))
    examples = openai_data.load_chat_jsonl(path)
    assert len(examples) == 12
    assert examples[0]["messages"][2] == {"role": "assistant", "content": "Ann"}


BAD_RECORDS = [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"prompt": "x", "completion": "y"}, "unrecognized key 'completion'"),
    ({}, "missing 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": ["hi"]}, "message 1: expected an object"),
    ({"messages": [{"content": "x"}]}, "message 1: missing 'role'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unrecognized role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "message 2: missing 'content'"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
     "'content' must be a string"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}, {"role": "assistant", "content": "y"}]},
     "message 1: unrecognized key 'extra'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
     "only allowed on assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "'weight' must be 0 or 1"),
    ("", "blank line"),
]


@pytest.mark.parametrize("bad, reason", BAD_RECORDS, ids=[r for _, r in BAD_RECORDS])
def test_invalid_line_is_named(tmp_path, bad, reason):
    records = [example(i) for i in range(12)]
    records.insert(6, bad)  # line 7
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl(records))
    with pytest.raises(DataError) as info:
        openai_data.load_chat_jsonl(path)
    assert info.value.line == 7
    assert info.value.path == str(path)
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}:7: ")


def test_tool_call_and_weight_examples_are_accepted(tmp_path):
    tool = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "weight": 1},
    ], "tools": [{"type": "function", "function": {"name": "w"}}]}
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([tool] * 10))
    assert len(openai_data.load_chat_jsonl(path)) == 10


def test_too_few_examples(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl(example(i) for i in range(9)))
    with pytest.raises(DataError, match="9 examples; OpenAI fine-tuning needs at least 10") as info:
        openai_data.load_chat_jsonl(path)
    assert info.value.line is None
    assert len(openai_data.load_chat_jsonl(path, min_examples=1)) == 9


def test_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        openai_data.load_chat_jsonl(tmp_path / "nope.jsonl")
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(example(i) for i in range(3)).encode() + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8") as info:
        openai_data.load_chat_jsonl(path)
    assert info.value.line == 4


def test_token_estimate_rule():
    ex = {"messages": [{"role": "user", "content": "a" * 8}, {"role": "assistant", "content": "abcde"}]}
    # 3 per example + (4 + 8/4) + (4 + ceil(5/4))
    assert openai_data.estimate_example_tokens(ex) == 3 + 6 + 6
    est = openai_data.estimate_dataset_tokens([ex, ex], context_limit_tokens=10)
    assert (est.n_examples, est.total_tokens, est.max_example_tokens, est.n_over_limit) == (2, 30, 15, 2)
    assert openai_data.estimate_dataset_tokens([ex], context_limit_tokens=100).n_over_limit == 0


def test_billed_tokens_and_cost():
    assert billed_tokens(1000, 3) == 3000
    assert estimate_cost_usd(2_000_000, 3.0) == pytest.approx(6.0)
    assert estimate_cost_usd(1000, None) is None


def test_price_lookup():
    # The prices live in the experiment YAML (dated there), not in code.
    prices = load_config("experiments/squad_openai.yaml").openai.training_price_per_million_tokens
    assert openai_data.training_price("gpt-4o-mini-2024-07-18", prices) == 3.0
    # A newer snapshot is not priced as its alias (nor gpt-4o-mini as gpt-4o): exact names only.
    assert openai_data.training_price("gpt-4.1-mini-2099-01-01", prices) is None
    assert openai_data.training_price("gpt-4o-mini-2099-01-01", {"gpt-4o": 25.0, "gpt-4o-mini": 3.0}) is None
    assert openai_data.training_price("ft:gpt-4o-mini-2024-07-18:org:squad:abc123", prices) == 3.0
    assert openai_data.training_price("my-model", prices) is None
    assert openai_data.training_price("gpt-4o-mini-2024-07-18") is None  # no table, no price
    assert openai_data.training_price("my-model", {"my-model": 1.25}) == 1.25
    assert openai_data.training_price("gpt-4o-2024-08-06", prices) == 25.0


CSV = (
    "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
    "1,2.5,0.5,,\n"
    "2,1.5,0.625,1.75,0.6\n"
    "3,1.0,0.75,,\n"
)


@pytest.mark.parametrize("encoding", ["plain", "base64", "base64-bytes-wrapped", "plain-bytes-bom"])
def test_result_file_parsing(encoding):
    if encoding == "plain":
        content: str | bytes = CSV
    elif encoding == "base64":
        content = base64.b64encode(CSV.encode()).decode()
    elif encoding == "base64-bytes-wrapped":
        encoded = base64.b64encode(CSV.encode())
        content = b"\n".join(encoded[i:i + 20] for i in range(0, len(encoded), 20)) + b"\n"
    else:
        content = b"\xef\xbb\xbf" + CSV.encode()
    points = openai_data.parse_result_file(content, timestamp_ms=123)
    assert points == [
        MetricPoint("train_loss", 2.5, 1, 123),
        MetricPoint("train_mean_token_accuracy", 0.5, 1, 123),
        MetricPoint("train_token_accuracy", 0.5, 1, 123),
        MetricPoint("train_loss", 1.5, 2, 123),
        MetricPoint("train_mean_token_accuracy", 0.625, 2, 123),
        MetricPoint("train_token_accuracy", 0.625, 2, 123),
        MetricPoint("val_loss", 1.75, 2, 123),
        MetricPoint("val_token_accuracy", 0.6, 2, 123),
        MetricPoint("valid_mean_token_accuracy", 0.6, 2, 123),
        MetricPoint("train_loss", 1.0, 3, 123),
        MetricPoint("train_mean_token_accuracy", 0.75, 3, 123),
        MetricPoint("train_token_accuracy", 0.75, 3, 123),
    ]


def test_result_file_full_valid_columns_and_errors():
    text = "step,train_loss,full_valid_loss,full_valid_mean_token_accuracy\n5,0.5,0.7,0.8\n"
    keys = {p.key: p.value for p in openai_data.parse_result_file(text)}
    assert keys == {"train_loss": 0.5, "full_valid_loss": 0.7, "full_valid_mean_token_accuracy": 0.8}
    with pytest.raises(DataError, match="neither CSV"):
        openai_data.parse_result_file("hello, world\n", source="openai:file-1")
    with pytest.raises(DataError, match="step 'x' is not a number") as info:
        openai_data.parse_result_file("step,train_loss\n1,2\nx,3\n", source="openai:file-1")
    assert info.value.line == 3 and info.value.path == "openai:file-1"


def test_metrics_from_event_data():
    data = {"step": 7, "train_loss": 1.25, "valid_loss": None, "train_mean_token_accuracy": 0.5,
            "valid_mean_token_accuracy": 0.4, "total_steps": 10, "full_valid_loss": float("nan")}
    points = openai_data.metrics_from_data(data, 5000)
    assert {(p.key, p.value, p.step, p.timestamp_ms) for p in points} == {
        ("train_loss", 1.25, 7, 5000),
        ("train_mean_token_accuracy", 0.5, 7, 5000),
        ("valid_mean_token_accuracy", 0.4, 7, 5000),
        # The same accuracies under the keys Vertex runs log, so both providers share one chart.
        ("train_token_accuracy", 0.5, 7, 5000),
        ("val_token_accuracy", 0.4, 7, 5000),
    }
    assert openai_data.metrics_from_data({"train_loss": 1.0}, 0) == []

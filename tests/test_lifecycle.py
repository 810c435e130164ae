"""Model lifecycle, capture and the migration rule: pure tables first, then the OpenAI fake behind the real SDK
(`models.retrieve`, a closed fine-tuning 403), then the local example's tune -> promote -> capture -> migrate."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from finetune_mlflow.agreement import agreement, read_prompts
from finetune_mlflow.config import load_config
from finetune_mlflow.errors import ConfigError, DataError
from finetune_mlflow.lifecycle_entries import lifecycle_entry_problem
from finetune_mlflow.lifecycle_facts import retiring_warning, shutdown_gate, soonest, to_tags
from finetune_mlflow.lifecycle_table import render, soonest_first, version_row
from finetune_mlflow.migration_plan import plan_migration
from finetune_mlflow.migration_rule import Interval, Rules, Standing, cost_per_1k, decision_text, pick, verdict
from finetune_mlflow.providers.base import ModelLifecycle
from finetune_mlflow.providers.openai.lifecycle import parse_shutdown_date

TODAY = dt.date(2026, 12, 3)
NOW = dt.datetime(2026, 12, 3, 12, tzinfo=dt.timezone.utc)
GOOD = {"shutdown_date": "2027-01-14", "source": "notice", "as_of": "2026-12-01"}


@pytest.mark.parametrize("entry, problem", [
    (GOOD, None),
    ({**GOOD, "new_jobs": "closed", "stage": "deprecated"}, None),
    ({**GOOD, "shutdown": "2027-01-14"}, "unknown key 'shutdown'"),
    ({"shutdown_date": "2027-01-14"}, "missing source, as_of"),
    ({**GOOD, "shutdown_date": "14/01/2027"}, "not a date"),
    ({**GOOD, "as_of": "yesterday"}, "as_of 'yesterday' is not a date"),
    ({**GOOD, "new_jobs": "no"}, "not one of open, closed"),
])
def test_lifecycle_entry_rules(entry, problem):
    found = lifecycle_entry_problem(entry)
    assert (found is None) if problem is None else (problem in found)


def test_config_reads_unquoted_dates_and_names_the_line_of_a_bad_entry(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lifecycle:\n  models:\n    m1:\n      shutdown_date: 2027-01-14\n      source: x\n"
                    "      as_of: 2026-12-01\n")
    assert load_config(good).lifecycle.models["m1"]["shutdown_date"] == "2027-01-14"
    bad = tmp_path / "bad.yaml"
    bad.write_text("tune:\n  epochs: 1\nlifecycle:\n  models:\n    m1:\n      shutdown_date: 2027-01-14\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5: lifecycle.models.m1: missing source, as_of"):
        load_config(bad)
    with pytest.raises(ConfigError, match="min_days_to_shutdown"):
        load_config(None, {"promotion.min_days_to_shutdown": "-1"})


@pytest.mark.parametrize("value, expected", [
    ("2027-01-14", dt.date(2027, 1, 14)), ("2027-01-14T00:00:00Z", dt.date(2027, 1, 14)),
    (1799884800, dt.date(2027, 1, 14)), ("1799884800", dt.date(2027, 1, 14)), (None, None), ("", None),
    ("soon", None),
])
def test_openai_shutdown_date_shapes(value, expected):
    assert parse_shutdown_date(value) == expected


def facts(model: str, date: dt.date | None, new_jobs: bool | None = None) -> ModelLifecycle:
    return ModelLifecycle(model, date, "deprecated" if date else None, new_jobs, "test", NOW)


def test_soonest_warning_and_gate():
    base, tuned = facts("gpt-base", dt.date(2027, 1, 14)), facts("ft:gpt-base:x", None)
    assert soonest(tuned, base) is base and soonest(None, tuned) is tuned and soonest(None) is None
    assert soonest(facts("a", dt.date(2027, 3, 1)), base) is base
    tags = to_tags(base, NOW)
    assert tags["finetune.shutdown_date"] == "2027-01-14" and tags["finetune.lifecycle_model"] == "gpt-base"
    assert to_tags(None, NOW)["finetune.shutdown_date"] == "unknown"
    line = retiring_warning("champion v1", tags, TODAY, warn_days=45)
    assert "gpt-base shuts down in 42 day(s)" in line and "-e migrate" in line
    assert retiring_warning("v1", tags, TODAY, warn_days=41) is None
    assert "shut down 3 day(s) ago" in retiring_warning("v1", tags, dt.date(2027, 1, 17), 45)
    assert retiring_warning("v1", to_tags(None, NOW), TODAY, 45) is None
    assert "within promotion.min_days_to_shutdown 45" in shutdown_gate(tags, TODAY, 45)
    assert shutdown_gate(tags, TODAY, 42) is None and shutdown_gate(to_tags(None, NOW), TODAY, 10_000) is None


def test_version_table_is_soonest_first():
    rows = soonest_first([
        version_row("b", "2", (), {"provider": "local", "tuned_model": "w"}, TODAY),
        version_row("a", "1", ("champion",), {"provider": "openai", "tuned_model": "ft:x",
                                              "finetune.shutdown_date": "2027-01-14"}, TODAY),
        version_row("a", "3", (), {"finetune.shutdown_date": "2026-12-23"}, TODAY)])
    assert [(r.model_name, r.version, r.days_left) for r in rows] == [("a", "3", 20), ("a", "1", 42), ("b", "2", None)]
    text = render(rows)
    assert text.splitlines()[2].split()[:5] == ["a", "1", "champion", "42", "2027-01-14"]


def test_prompts_jsonl_csv_and_bad_lines(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"question": "Q?", "context": "C."}) + "\n\n"
                     + json.dumps({"id": "x", "question": "Q2?", "context": "C2."}) + "\n")
    assert [p["id"] for p in read_prompts(jsonl)] == ["prompt-1", "x"]
    csv = tmp_path / "p.csv"
    csv.write_text('question,context\n"Q, with comma?",C.\n')
    assert read_prompts(csv)[0] == {"id": "prompt-2", "question": "Q, with comma?", "context": "C."}
    for text, where in (('{"question": "Q"}\n', "p2.jsonl:1: context is missing"),
                        ('{"question": "Q", "context": "C"}\nnot json\n', "p2.jsonl:2: not valid JSON"),
                        ('[1]\n', "p2.jsonl:1: expected an object"),
                        ('{"id": "a", "question": "Q", "context": "C"}\n' * 2, "p2.jsonl:2: id 'a' already used")):
        (tmp_path / "p2.jsonl").write_text(text)
        with pytest.raises(DataError, match=where):
            read_prompts(tmp_path / "p2.jsonl")
    (tmp_path / "p3.csv").write_text("q,context\nQ,C\n")
    with pytest.raises(DataError, match="header lacks question"):
        read_prompts(tmp_path / "p3.csv")


def test_agreement_scores_against_recorded_answers():
    recorded = {"1": "Warsaw", "2": "blue sky", "3": ""}  # 3: the recorded model failed: not counted
    metrics = agreement({"1": "Warsaw", "2": "sky"}, recorded, samples=200, seed=0)
    assert metrics["agreement_n"] == 2
    assert metrics["agreement_exact_match"] == pytest.approx(50.0)
    assert metrics["agreement_f1"] == pytest.approx((100 + 100 * 2 / 3) / 2)
    assert metrics["agreement_f1_ci_low"] <= metrics["agreement_f1"] <= metrics["agreement_f1_ci_high"]
    assert agreement({}, {"1": ""}, samples=100, seed=0) == {}


@pytest.mark.parametrize("block, message", [
    (None, "needs a migration: block"),
    ({"candidates": []}, "needs a migration: block"),
    ({"candidates": [{"provider": "local"}], "max_f1_loss": 1}, "at least provider and base_model"),
    ({"candidates": [{"provider": "local", "base_model": "b"}]}, "migration.max_f1_loss is required"),
    ({"candidates": [{"provider": "local", "base_model": "b"}], "max_f1_loss": -1}, "from 0 to 100"),
    ({"candidates": [{"provider": "local", "base_model": "b", "registered_model_name": "x"}], "max_f1_loss": 1},
     "cannot differ between candidates"),
    ({"candidates": [{"provider": "local", "base_model": "b", "max_examples": 5}], "max_f1_loss": 1},
     "cannot differ between candidates"),
    ({"candidates": [{"provider": "local", "base_model": "b", "epoch": 2}], "max_f1_loss": 1}, "unknown key 'epoch'"),
    ({"candidates": [{"provider": "local", "base_model": "b"}] * 2, "max_f1_loss": 1}, "listed twice"),
    ({"candidates": [{"provider": "local", "base_model": "b"}], "max_f1_loss": 1, "grid": {}}, "unknown key 'grid'"),
])
def test_migration_block_is_refused_before_anything_runs(block, message):
    with pytest.raises(ConfigError, match=message):
        plan_migration(block, "m.yaml")


def standing(label, delta_low, cost, *, f1=50.0, agreement_low=None, days=None, error_rate=0.0, latency=10.0):
    return Standing(label, label, "run", Interval(f1, f1 - 3, f1 + 3), Interval(delta_low + 2, delta_low,
                    delta_low + 4), Interval(agreement_low + 5, agreement_low, 100.0) if agreement_low is not None
                    else None, latency, error_rate, cost, "2027-02-01" if days is not None else "unknown", days)


RULES = Rules(max_f1_loss=2.0, max_agreement_loss=30.0, agreement_required=False, max_latency_ms_p95=100.0,
              max_error_rate=0.05, min_days_to_shutdown=30)


def test_non_inferiority_rule_and_cheapest_wins():
    candidates = [standing("worse", -2.5, 0.01), standing("pricey", -1.0, 0.50), standing("cheap", -1.9, 0.02),
                  standing("cheap-better", -0.5, 0.02, f1=60.0), standing("unknown-cost", 1.0, None),
                  standing("retiring", 3.0, 0.0, days=20), standing("slow", 3.0, 0.0, latency=150.0),
                  standing("flaky", 3.0, 0.0, error_rate=0.2)]
    verdicts = [verdict(c, RULES) for c in candidates]
    assert [v.passed for v in verdicts] == [False, True, True, True, True, False, False, False]
    assert "missed by 0.50 points" in verdicts[0].text()
    assert "shuts down on 2027-02-01, 20 day(s)" in verdicts[5].text()
    assert pick(candidates, verdicts).label == "cheap-better"  # ties on cost: higher F1
    assert pick(candidates[:2], verdicts[:2]).label == "pricey"
    assert pick(candidates[4:5], verdicts[4:5]).label == "unknown-cost"
    assert pick([candidates[0]], [verdicts[0]]) is None
    strict = Rules(**{**RULES.__dict__, "agreement_required": True})
    assert not verdict(standing("no-capture", 1.0, 0.0), strict).passed
    assert "missed by 5.00" in verdict(standing("disagrees", 1.0, 0.0, agreement_low=65.0), strict).text()
    assert verdict(standing("agrees", 1.0, 0.0, agreement_low=71.0), strict).passed
    assert "its tune failed" in verdict(Standing("x", None, None, None, failed="its tune failed: boom"), RULES).text()
    champion = Standing("champion", "1", "r", Interval(50, 47, 53), shutdown_date="2027-01-14", days_left=42)
    text = decision_text(champion, "gpt-4o-mini-2024-07-18", candidates[3])
    assert "gpt-4o-mini-2024-07-18 (champion v1) shuts down on 2027-01-14" in text and "v" in text
    assert "the champion stays" in decision_text(champion, "m", None)


def test_cost_per_thousand_requests():
    assert cost_per_1k(100, 50_000, 1_000, (0.30, 1.20), bills=True) == pytest.approx((0.015 + 0.0012) / 100 * 1000)
    assert cost_per_1k(100, None, None, None, bills=False) == 0.0
    assert cost_per_1k(100, 5.0, 5.0, None, bills=True) is None


def test_candidate_reuse_ignores_lifecycle_and_promotion_edits():
    from finetune_mlflow.migration import reuse_key

    config = load_config(None, {}).to_dict()
    edited = {**config, "lifecycle": {"warn_days": 10, "models": {"m": GOOD}},
              "promotion": {**config["promotion"], "min_days_to_shutdown": 90}}
    assert reuse_key(edited) == reuse_key(config)
    assert reuse_key({**config, "tune": {**config["tune"], "epochs": 9}}) != reuse_key(config)
    assert reuse_key({**config, "local": {**config["local"], "max_span_tokens": 4}}) != reuse_key(config)

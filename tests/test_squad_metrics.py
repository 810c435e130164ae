"""SQuAD v1.1 EM/F1: hand-checked tricky cases, and agreement with the official evaluate-v1.1.py.

The official script is not in this repository. GOLDEN holds what it printed (`python evaluate-v1.1.py
data/squad/validation.json <file>`) for the prediction files `make_predictions` generates; the generator is
deterministic, so `finetune-mlflow score` must print the same numbers to 1e-9.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from finetune_mlflow.cli import main as cli_main
from finetune_mlflow.squad_metrics import (
    best_over_golds,
    exact_match,
    f1,
    iter_squad_questions,
    normalize_answer,
    score_predictions,
)
from tests.conftest import ROOT, SQUAD_VALIDATION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  A  dog,  an apple! ", "dog apple"),
        ("theater anthem banana", "theater anthem banana"),  # articles inside words stay
        ("1,000,000", "1000000"),  # ASCII comma removed, digits joined
        ("3.14", "314"),
        ("rock–paper", "rock–paper"),  # en dash is not in string.punctuation: kept
        ("“quoted”", "“quoted”"),  # curly quotes are Unicode punctuation: kept, as the official script does
        ("THE END", "end"),
        ("", ""),
        ("a an the", ""),
    ],
)
def test_normalize_answer_follows_official_rules(text, expected):
    assert normalize_answer(text) == expected


def test_f1_is_token_overlap_with_multiplicity():
    assert f1("the cat sat", "cat") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    assert f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1("", "cat") == 0.0
    assert f1("cat", "") == 0.0
    assert f1("the", "a") == 0.0  # both normalize to nothing: no overlap, F1 0 (EM would be 1)
    assert exact_match("the", "a") == 1.0


def test_best_over_golds_takes_the_maximum_over_answers_of_different_lengths():
    em, score = best_over_golds("Denver Broncos", ["Broncos", "the Denver Broncos", "Denver Broncos team"])
    assert em == 1.0 and score == 1.0
    em, score = best_over_golds("Broncos team", ["Denver Broncos", "Broncos"])
    assert em == 0.0 and score == pytest.approx(2 / 3)


def test_missing_predictions_score_zero_and_are_counted():
    golds = [("q1", ["yes"]), ("q2", ["no"])]
    result = score_predictions(golds, {"q1": "yes"})
    assert result.exact_match == 50.0 and result.f1 == 50.0 and result.n_missing == 1


def make_predictions(seed: int) -> dict[str, str]:
    """Gold answers, perturbed gold answers, random context spans, empty strings and missing ids, by seed."""
    rng = random.Random(seed)
    dataset = json.loads(SQUAD_VALIDATION.read_text(encoding="utf-8"))
    predictions = {}
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            words = paragraph["context"].split()
            for qa in paragraph["qas"]:
                gold = rng.choice(qa["answers"])["text"]
                kind = rng.randrange(6)
                if kind == 0:
                    predictions[qa["id"]] = gold
                elif kind == 1:
                    predictions[qa["id"]] = f"The {gold.upper()}!"
                elif kind == 2:
                    extra = rng.choice(words)
                    predictions[qa["id"]] = f"{gold} {extra}" if rng.random() < 0.5 else f"{extra}, {gold}"
                elif kind == 3:
                    start = rng.randrange(len(words))
                    predictions[qa["id"]] = " ".join(words[start: start + rng.randint(1, 6)])
                elif kind == 4:
                    predictions[qa["id"]] = ""
                # kind 5: no prediction at all
    return predictions


# What the official evaluate-v1.1.py printed for make_predictions(seed) on data/squad/validation.json.
GOLDEN = {
    0: {"exact_match": 36.059479553903344, "f1": 47.95579908269552},
    1: {"exact_match": 36.80297397769517, "f1": 50.24764885273879},
    2: {"exact_match": 35.39033457249071, "f1": 48.706586836559104},
}


@pytest.mark.parametrize("seed", sorted(GOLDEN))
def test_score_command_matches_official_script(seed, tmp_path, capsys):
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(make_predictions(seed)), encoding="utf-8")
    assert cli_main(["score", str(SQUAD_VALIDATION), str(predictions)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["exact_match"] == pytest.approx(GOLDEN[seed]["exact_match"], abs=1e-9)
    assert printed["f1"] == pytest.approx(GOLDEN[seed]["f1"], abs=1e-9)
    assert re.search(r"warning: \d+ of 1345 questions have no prediction", captured.err)


def test_perfect_predictions_score_100():
    dataset = json.loads(SQUAD_VALIDATION.read_text(encoding="utf-8"))
    golds = list(iter_squad_questions(dataset))
    result = score_predictions(golds, {qid: answers[0] for qid, answers in golds})
    assert result.exact_match == 100.0 and result.f1 == 100.0 and result.n_questions == 1345


def test_score_runs_as_module(tmp_path):
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps({}), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "finetune_mlflow", "score", str(SQUAD_VALIDATION), str(predictions)],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(done.stdout) == {"exact_match": 0.0, "f1": 0.0}
    assert "1345 of 1345" in done.stderr

"""SQuAD v1.1 Exact Match and F1, written to agree with the official `evaluate-v1.1.py` to the last bit.

The official rules (Rajpurkar et al. 2016): lower-case; remove every character in `string.punctuation` (ASCII
only, so Unicode punctuation such as an en dash survives); remove the whole words a/an/the; collapse whitespace.
F1 is over the multiset of whitespace tokens; each prediction takes its best score over all gold answers; the
dataset score is the mean over questions, times 100, and a question without a prediction scores 0.
The one implementation used by every evaluation in this project.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    lowered = text.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    without_articles = _ARTICLES.sub(" ", without_punctuation)
    return " ".join(without_articles.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def best_over_golds(prediction: str, golds: Iterable[str]) -> tuple[float, float]:
    """(em, f1) of one prediction: the maximum over every gold answer, each in [0, 1]."""
    golds = list(golds)
    return (
        max(exact_match(prediction, gold) for gold in golds),
        max(f1(prediction, gold) for gold in golds),
    )


@dataclass(frozen=True)
class DatasetScore:
    exact_match: float
    f1: float
    n_questions: int
    n_missing: int


def iter_squad_questions(dataset: Mapping) -> Iterable[tuple[str, list[str]]]:
    """(id, gold answer texts) for every question of a SQuAD v1.1 JSON object, in file order."""
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield qa["id"], [answer["text"] for answer in qa["answers"]]


def score_predictions(golds_by_id: Iterable[tuple[str, list[str]]], predictions: Mapping[str, str]) -> DatasetScore:
    """Dataset EM/F1 in 0-100 summed in file order, as the official script does, so floats agree exactly."""
    total_em = total_f1 = 0.0
    count = missing = 0
    for question_id, golds in golds_by_id:
        count += 1
        if question_id not in predictions:
            missing += 1
            continue
        em, f1_score = best_over_golds(predictions[question_id], golds)
        total_em += em
        total_f1 += f1_score
    if count == 0:
        return DatasetScore(0.0, 0.0, 0, missing)
    return DatasetScore(100.0 * total_em / count, 100.0 * total_f1 / count, count, missing)

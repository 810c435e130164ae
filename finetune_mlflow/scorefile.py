"""`finetune-mlflow score dataset.json predictions.json`: the official SQuAD v1.1 evaluation of a predictions file,
with every bad input reported as one `file: reason` line instead of a traceback.

It scores every question of the dataset file, as `evaluate-v1.1.py` does; `evaluate` scores the prepared
validation split, from which exact duplicate questions were removed, so its `eval_n` can be a few lower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_mlflow.errors import DataError
from finetune_mlflow.squad_metrics import DatasetScore, iter_squad_questions, score_predictions


def _read_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(path, None, "JSON nested too deeply") from None


def _questions(path: str, dataset: Any) -> list[tuple[str, list[str]]]:
    try:
        return [(str(qid), [str(g) for g in golds]) for qid, golds in iter_squad_questions(dataset)]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(path, None, f"not a SQuAD v1.1 dataset (data[].paragraphs[].qas[] with id and answers "
                        f"expected; failed at {e!r})") from None


def score_files(dataset_path: str, predictions_path: str) -> DatasetScore:
    """The official script's scores of a predictions file against a SQuAD v1.1 dataset file."""
    questions = _questions(dataset_path, _read_json(dataset_path))
    predictions = _read_json(predictions_path)
    if not isinstance(predictions, dict):
        raise DataError(predictions_path, None, f"expected an object of question id -> answer text, got "
                        f"{type(predictions).__name__}")
    bad = next((qid for qid, text in predictions.items() if not isinstance(text, str)), None)
    if bad is not None:
        raise DataError(predictions_path, None, f"the prediction for {bad!r} is {type(predictions[bad]).__name__}, "
                        "expected a string")
    return score_predictions(questions, predictions)

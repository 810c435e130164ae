"""The local span ranker, the statistics and the evaluation core, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_mlflow.providers.local import span_model
from finetune_mlflow.config import PromotionConfig
from finetune_mlflow.evaluation import EvaluationRun, ExampleResult, check_error_rate, delta_against, \
    run_predictions, summarize
from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.promotion import Evidence, decide
from finetune_mlflow.providers.base import Prediction
from finetune_mlflow.stats import bootstrap_interval, latency_summary, paired_bootstrap_delta

CONTEXT = ("The Normans were descended from Norse raiders. In 911 Rollo signed a treaty with King Charles III. "
           "The duchy of Normandy was founded in the 10th century.")


def test_candidate_spans_stay_inside_sentences_and_skip_punctuation():
    p = span_model.passage(CONTEXT, 8)
    assert len(p.span_start) > 0
    assert np.all(p.sentence[p.span_start] == p.sentence[p.span_end])
    assert np.all(p.span_end - p.span_start < 8)
    for i, j in zip(p.span_start, p.span_end):
        assert p.lower[i][0].isalnum() and p.lower[j][0].isalnum()


def test_question_types():
    assert span_model.QUESTION_TYPES[span_model.question_type("In what year did Rollo sign?")] == "when"
    assert span_model.QUESTION_TYPES[span_model.question_type("How many raiders?")] == "number"
    assert span_model.QUESTION_TYPES[span_model.question_type("Who signed the treaty?")] == "who"


def test_gradient_matches_finite_differences():
    f = span_model.features("In what year did Rollo sign a treaty?", CONTEXT, {}, 6)
    gold = span_model.gold_spans(f, ["911"])
    assert len(gold) == 1
    w = span_model.initial_weights(6)
    _, grads = span_model.loss_and_gradient(f, gold, w)
    rng = np.random.default_rng(0)
    for block in ("start", "end", "inside", "length"):
        array = w.arrays()[block]
        row, col = 1 + f.qtype, int(rng.integers(array.shape[1]))
        original = array[row, col]
        array[row, col] = original + 1e-5
        up = span_model.loss_and_gradient(f, gold, w, want_gradient=False)[0]
        array[row, col] = original - 1e-5
        down = span_model.loss_and_gradient(f, gold, w, want_gradient=False)[0]
        array[row, col] = original
        assert grads.arrays()[block][row, col] == pytest.approx((up - down) / 2e-5, abs=1e-5)


def test_training_lowers_the_loss_on_a_tiny_set():
    rows = [("In what year did Rollo sign a treaty?", "911"), ("Who signed a treaty?", "Rollo"),
            ("Who were the Normans descended from?", "Norse raiders")]
    data = []
    for question, answer in rows:
        f = span_model.features(question, CONTEXT, {}, 6)
        data.append((f, span_model.gold_spans(f, [answer])))
    start = span_model.initial_weights(6)
    before = span_model.mean_loss(data, start)
    last = None
    for _, last in span_model.train(data, data, start, epochs=20, learning_rate=0.05, batch_size=3, seed=0,
                                    eval_every_steps=5):
        pass
    assert span_model.mean_loss(data, last) < before / 2
    assert span_model.predict_span(data[0][0], last) == "911"


def test_latency_summary_and_bootstrap_are_reproducible():
    summary = latency_summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert summary["latency_ms_p50"] == 3.0 and summary["latency_ms_max"] == 100.0
    assert set(summary) == {"latency_ms_mean", "latency_ms_max", "latency_ms_p50", "latency_ms_p90",
                            "latency_ms_p95", "latency_ms_p99"}
    values = np.random.default_rng(1).random(200) * 100
    first = bootstrap_interval(values, samples=500, seed=3)
    assert first == bootstrap_interval(values, samples=500, seed=3)
    assert first.low < first.estimate < first.high
    delta = paired_bootstrap_delta(values + 5, values, samples=500, seed=3)
    assert delta.low == pytest.approx(5.0) and delta.high == pytest.approx(5.0)


def _result(qid, f1, error=None):
    return ExampleResult(qid, "q", "p", ["g"], float(f1 == 1.0), f1, None if error else 2.0, error)


def test_summarize_counts_errors_as_zero_and_reports_throughput():
    run = EvaluationRun([_result("a", 1.0), _result("b", 0.5), _result("c", 0.0, error="RateLimit")], 1.5)
    metrics = summarize(run, bootstrap_samples=200, seed=0)
    assert metrics["eval_f1"] == pytest.approx(50.0)
    assert metrics["eval_exact_match"] == pytest.approx(100 / 3)
    assert metrics["eval_error_count"] == 1 and metrics["eval_n"] == 3
    assert metrics["eval_throughput_rps"] == pytest.approx(2.0)
    with pytest.raises(FinetuneError, match="1 of 3 evaluation requests failed"):
        check_error_rate(run, 0.2)
    check_error_rate(run, 0.5)


def test_run_predictions_records_failures_and_keeps_order():
    def predict(question, context):
        if question == "boom":
            raise RuntimeError("503 from server")
        return Prediction(context, 1.0, input_tokens=3, output_tokens=1)

    examples = [{"id": str(i), "question": q, "context": "Ada", "answers": ["Ada"]}
                for i, q in enumerate(["ok", "boom", "ok"])]
    run = run_predictions(predict, examples, max_concurrency=2)
    assert [r.id for r in run.results] == ["0", "1", "2"]
    assert run.results[1].error == "RuntimeError: 503 from server" and run.results[0].f1 == 1.0
    metrics = summarize(run, bootstrap_samples=100, seed=0)
    assert metrics["eval_input_tokens"] == 6


def test_delta_against_baseline_is_paired():
    candidate = [_result(str(i), 1.0) for i in range(50)]
    baseline = [ExampleResult.from_row({"id": str(i), "f1": 0.5, "em": 0.0}) for i in range(50)]
    metrics = delta_against(candidate, baseline, bootstrap_samples=200, seed=0)
    assert metrics["eval_f1_delta"] == pytest.approx(50.0)
    assert metrics["eval_f1_delta_ci_low"] == pytest.approx(50.0)


@pytest.mark.parametrize(
    ("evidence", "promote", "reason"),
    [
        (Evidence(40.0, 0.0, 10.0), False, "no base-model results"),
        (Evidence(40.0, 0.5, 10.0, "base model", 30.0, 10.0, 8.0, 12.0), False, "error rate"),
        (Evidence(45.0, 0.0, 10.0, "champion v1", 40.0, f1_delta=5.0, f1_delta_ci_low=2.0, f1_delta_ci_high=8.0),
         True, "clears"),
        (Evidence(41.0, 0.0, 10.0, "champion v1", 40.0, f1_delta=1.0, f1_delta_ci_low=-1.0, f1_delta_ci_high=3.0),
         False, "does not clear"),
        # No champion: the base model is the reference, and a model worse than it is never promoted.
        (Evidence(25.0, 0.0, 10.0, "base model", 58.3, f1_delta=-33.3, f1_delta_ci_low=-36.0, f1_delta_ci_high=-30.0),
         False, "over the base model"),
    ],
)
def test_promotion_gates(evidence, promote, reason):
    decision = decide(evidence, PromotionConfig(max_error_rate=0.1))
    assert decision.promote is promote and reason in decision.reason


def test_latency_gate():
    gates = PromotionConfig(max_latency_ms_p95=5.0)
    better = dict(reference="base model", reference_f1=30.0, f1_delta=10.0, f1_delta_ci_low=8.0, f1_delta_ci_high=12.0)
    assert not decide(Evidence(40.0, 0.0, 10.0, **better), gates).promote
    assert decide(Evidence(40.0, 0.0, 4.0, **better), gates).promote


def test_features_do_not_depend_on_the_string_hash_seed():
    """Set iteration order changes with PYTHONHASHSEED; float sums over sets must not, or training drifts."""
    import os
    import subprocess
    import sys

    script = (
        "import hashlib; from finetune_mlflow.providers.local import span_model as s; "
        f"f = s.features('What did Rollo sign with King Charles in 911 treaty?', {CONTEXT!r}, "
        "{'rollo': 2.5, 'sign': 1.3, 'king': 1.7, 'charle': 2.1, 'treaty': 2.9, '911': 3.3}, 6); "
        "print(hashlib.sha256(f.start.tobytes() + f.inside.tobytes()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
        for seed in (1, 2, 3)
    }
    assert len(digests) == 1

"""The local span ranker, the statistics and the evaluation core, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_mlflow.providers.local import span_features, span_model
from finetune_mlflow.providers.local.span_corpus import batch, build_corpus, spans
from finetune_mlflow.config import PromotionConfig
from finetune_mlflow.evaluation import EvaluationRun, ExampleResult, check_error_rate, delta_against, \
    run_predictions, summarize
from finetune_mlflow.errors import FinetuneError
from finetune_mlflow.promotion import Evidence, decide
from finetune_mlflow.providers.base import Prediction
from finetune_mlflow.stats import bootstrap_interval, latency_summary, paired_bootstrap_delta

CONTEXT = ("The Normans were descended from Norse raiders. In 911 Rollo signed a treaty with King Charles III. "
           "The duchy of Normandy was founded in the 10th century.")


def _corpus(rows: list[tuple[str, str]], size: int = 6):
    p = span_features.passage(CONTEXT)
    idf = {"rollo": 2.5, "sign": 1.3, "treaty": 2.9, "norman": 2.0}
    return build_corpus([p], [(0, span_features.question(q, p, idf, [a], size)) for q, a in rows]), p


def test_candidate_spans_stay_inside_sentences_and_skip_punctuation():
    corpus, p = _corpus([("Who signed a treaty?", "Rollo")])
    b = batch(corpus, np.arange(1), 8)
    s = spans(b, 8)
    assert len(s.i) > 0 and s.gold.sum() == 1
    assert np.all(b.sentence[s.i] == b.sentence[s.j]) and np.all(s.j - s.i < 8)
    assert not b.punct[s.i].any() and not b.punct[s.j].any()


def test_question_types():
    assert span_model.QUESTION_TYPES[span_features.question_type("In what year did Rollo sign?")] == "when"
    assert span_model.QUESTION_TYPES[span_features.question_type("How many raiders?")] == "number"
    assert span_model.QUESTION_TYPES[span_features.question_type("Who signed the treaty?")] == "who"


def test_question_words_know_their_place_around_the_wh_word_and_the_focus_noun():
    """The wh-word's neighbours in the question are the answer's neighbours in the context ("Rollo signed what"
    -> "Rollo signed a treaty"); in "what type of treaty" the answer's category is "treaty", not "type"."""
    p = span_features.passage(CONTEXT)
    q = span_features.question("In 911 Rollo signed what type of treaty with King Charles?", p, {}, ["a treaty"], 6)
    words = [p.text[slice(*p.offsets[k])] for k in q.matched]
    assert dict(zip(words, q.place.tolist())) == {"911": 0, "Rollo": 1, "signed": 2, "treaty": 4, "King": 5,
                                                  "Charles": 6}
    assert q.focus == q.matched_stem[words.index("treaty")]
    assert span_features.WEIGHT_TYPES[q.qtype] == "what"
    assert span_features.WEIGHT_TYPES[span_features.question("What did Rollo sign?", p, {}, [], 6).qtype] == \
        "what (object)"


def test_gradient_matches_finite_differences():
    corpus, _ = _corpus([("In what year did Rollo sign a treaty?", "911"), ("Who signed a treaty?", "Rollo"),
                         ("What type of treaty did Rollo sign?", "a treaty")])
    b = batch(corpus, np.arange(3), 6)
    w = span_model.initial_weights(6)
    rng = np.random.default_rng(0)
    for block in w.blocks.values():
        block += rng.normal(0, 0.1, block.shape)
    _, gradient = span_model.batch_loss(b, w, 6)
    dense = gradient.as_dense(w)
    for name, array in w.blocks.items():
        row, col = np.unravel_index(int(np.argmax(np.abs(dense[name]))), array.shape)
        original = array[row, col]
        array[row, col] = original + 1e-5
        up = span_model.batch_loss(b, w, 6, want_gradient=False)[0].sum()
        array[row, col] = original - 1e-5
        down = span_model.batch_loss(b, w, 6, want_gradient=False)[0].sum()
        array[row, col] = original
        assert dense[name][row, col] == pytest.approx((up - down) / 2e-5, abs=1e-5), name


def test_training_lowers_the_loss_on_a_tiny_set():
    corpus, p = _corpus([("In what year did Rollo sign a treaty?", "911"), ("Who signed a treaty?", "Rollo"),
                         ("Who were the Normans descended from?", "Norse raiders")])
    start = span_model.initial_weights(6)
    before = span_model.mean_loss(corpus, start, 6)
    reports, last = [], None
    for report, last in span_model.train(corpus, corpus, start, epochs=20, learning_rate=0.05, batch_size=3,
                                         seed=0, eval_every_steps=5, max_span_tokens=6):
        reports.append(report)
    assert span_model.mean_loss(corpus, last, 6) < before / 2
    assert sum(r.epoch_end for r in reports) == 20 and all(r.val_loss is not None for r in reports if r.epoch_end)
    assert span_model.answer(p, "In what year did Rollo sign a treaty?", {}, last, 6) == "911"


def test_weight_averaging_yields_the_running_mean_of_the_snapshots():
    """Snapshots every `average_every` steps and at each epoch's end (a run shorter than `average_every` steps
    still averages its epochs, never the untrained start)."""
    corpus, _ = _corpus([("In what year did Rollo sign a treaty?", "911"), ("Who signed a treaty?", "Rollo")])
    start = span_model.initial_weights(6)
    options = dict(epochs=3, learning_rate=0.05, batch_size=1, seed=0, eval_every_steps=1, max_span_tokens=6)
    plain = [w.copy() for _, w in span_model.train(corpus, corpus, start, **options)]
    averaged = [w.copy() for _, w in span_model.train(corpus, corpus, start, average_every=5, **options)]
    np.testing.assert_array_equal(averaged[0].blocks["start"], plain[0].blocks["start"])  # before any snapshot
    snapshots = [plain[k] for k in (1, 3, 4, 5)]  # epoch ends (steps 2, 4, 6) and step 5
    for name, block in averaged[-1].blocks.items():
        np.testing.assert_allclose(block, sum(w.blocks[name] for w in snapshots) / 4, atol=1e-12)


def test_an_empty_or_punctuation_only_context_answers_nothing():
    w = span_model.initial_weights(6)
    assert span_model.answer(span_features.passage(""), "Who?", {}, w, 6) == ""
    assert span_model.answer(span_features.passage("... !"), "Who?", {}, w, 6) == ""


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
         False, "not above the base model"),
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
        "import hashlib, numpy as np; from finetune_mlflow.providers.local import span_features as f, span_model as m; "
        "from finetune_mlflow.providers.local.span_corpus import batch, build_corpus; "
        f"p = f.passage({CONTEXT!r}); q = f.question('What did Rollo sign with King Charles in 911 treaty?', p, "
        "{'rollo': 2.5, 'sign': 1.3, 'king': 1.7, 'charle': 2.1, 'treaty': 2.9, '911': 3.3}, ['a treaty'], 6); "
        "blocks = m.question_block(batch(build_corpus([p], [(0, q)]), np.arange(1), 6)); "
        "print(hashlib.sha256(b''.join(x.tobytes() for x in blocks) + p.start_ids.tobytes()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
        for seed in (1, 2, 3)
    }
    assert len(digests) == 1

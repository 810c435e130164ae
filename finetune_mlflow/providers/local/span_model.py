"""The local provider's model: a linear extractive span ranker, trained by minibatch Adam (numpy + scipy.sparse).

A span (i..j) inside one sentence of the context scores
    s(i, j) = start(i) + end(j) + sum_{k=i..j} inside(k) + length(j - i)
where each term is a dot product of token features with weights, and every weight column is repeated per
question type (who/when/how many..., "what" split by form: sf.WEIGHT_TYPES) so that "when" can learn to like
years and "who" capitalized words: a weight block has shape (features, 1 + types), column 0 shared, column 1 + t
for type t. Because the score decomposes over
tokens, every span of a minibatch is scored with one sparse product per role and a few vector operations, and the
softmax gradient over all spans is exact (no candidate sampling). The loss is -log P(gold spans).

"Base" is the hand-set initial weights (a reading-comprehension heuristic: near question words, in the
best-matching sentence, not repeating the question); tuning starts from it, so the tuned model's gain is the
learning. Pure functions and plain data: no MLflow, no files, no network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from finetune_mlflow.providers.local import span_features as sf
from finetune_mlflow.providers.local.span_corpus import Batch, Corpus, Spans, batch, build_corpus, spans

QUESTION_TYPES = sf.QUESTION_TYPES
TYPES = 1 + len(sf.WEIGHT_TYPES)
DISTANCE_BUCKETS = (1, 2, 3, 6, 10)
START_DYNAMIC = ("sent_score", "sent_best", "sent_second", "sent_far", "window", "match_left1", "match_left3",
                 "left_bigram", "sent_left_idf", "sent_bigrams", "left_before_wh", "left_after_wh",
                 "near_left_before_wh", "near_left_after_wh") + tuple(
    f"{form}left_match<={d}" for form in ("", "object_") for d in DISTANCE_BUCKETS) + ("focus_left2",) + tuple(
    f"left{d}_place{k}" for d in (1, 3, "_sentence") for k in range(sf.QPOS_BUCKETS))
END_DYNAMIC = ("match_right1", "match_right3", "right_bigram", "sent_right_idf", "right_after_wh", "right_before_wh",
               "near_right_after_wh", "near_right_before_wh") + tuple(
    f"{form}right_match<={d}" for form in ("", "object_") for d in DISTANCE_BUCKETS) + ("focus_right2",) + tuple(
    f"right{d}_place{k}" for d in (1, 3, "_sentence") for k in range(sf.QPOS_BUCKETS))
INSIDE_DYNAMIC = ("q_match", "q_match_idf", "focus")
START_NAMES = sf.STATIC_START_NAMES + START_DYNAMIC
END_NAMES = sf.STATIC_END_NAMES + END_DYNAMIC
INSIDE_NAMES = sf.STATIC_INSIDE_NAMES + INSIDE_DYNAMIC
TABLE_ROWS = {"start": sf.START_IDS_WIDTH, "end": sf.END_IDS_WIDTH, "inside": sf.INSIDE_IDS_WIDTH}
# Per role: weights of the dense features (names) and a table the role's id columns index.
BLOCKS = {"start": len(START_NAMES), "end": len(END_NAMES), "inside": len(INSIDE_NAMES),
          "start_ids": sf.START_IDS_WIDTH, "end_ids": sf.END_IDS_WIDTH, "inside_ids": sf.INSIDE_IDS_WIDTH}


@dataclass
class Weights:
    """One (features, 1 + types) block per role, plus the span-length table (max_span_tokens, 1 + types)."""

    blocks: dict[str, np.ndarray]

    def copy(self) -> "Weights":
        return Weights({k: v.copy() for k, v in self.blocks.items()})


def initial_weights(max_span_tokens: int) -> Weights:
    """The base model: a reading-comprehension heuristic, also the point tuning starts from."""
    w = Weights({name: np.zeros((width, TYPES)) for name, width in BLOCKS.items()})
    w.blocks["length"] = np.zeros((max_span_tokens, TYPES))

    def put(block: str, names: tuple[str, ...], name: str, value: float, qtype: str | None = None) -> None:
        w.blocks[block][names.index(name), 0 if qtype is None else 1 + QUESTION_TYPES.index(qtype)] = value

    for name, value in (("sent_best", 2.0), ("sent_score", 2.0), ("window", 1.0), ("match_left3", 0.5),
                        ("stop", -1.0)):
        put("start", START_NAMES, name, value)
    for name, value in (("match_right3", 0.3), ("stop", -1.0), ("next_punct", 0.3)):
        put("end", END_NAMES, name, value)
    for name, value, qtype in (("q_match", -3.0, None), ("length", -0.1, None), ("stop", -0.2, None),
                               ("year", 1.5, "when"),
                               ("month", 1.0, "when"), ("digit", 1.5, "number"), ("number_word", 1.0, "number"),
                               ("cap", 0.5, "who"), ("cap", 0.3, "where")):
        put("inside", INSIDE_NAMES, name, value, qtype)
    w.blocks["length"][: min(3, max_span_tokens), 0] = 0.3
    return w


def _clipped_sum(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """sum(values[lo[k]:hi[k]]) for every k (hi exclusive)."""
    padded = np.concatenate([[0.0], np.cumsum(values)])
    return padded[hi] - padded[np.minimum(lo, hi)]


def _window_sum(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`_clipped_sum` of every column of a (T, c) array."""
    padded = np.vstack([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    return padded[hi] - padded[np.minimum(lo, hi)]


def _distance_buckets(matched: np.ndarray, sentence: np.ndarray, direction: int) -> np.ndarray:
    """(T, buckets): is the nearest matched token on one side (+1 left, -1 right) in the same sentence <= d away."""
    n = len(matched)
    if n == 0:
        return np.zeros((0, len(DISTANCE_BUCKETS)), dtype=bool)
    index = np.arange(n) if direction > 0 else np.arange(n)[::-1]
    marks = np.where(matched[index], np.arange(n), -1)
    seen = np.maximum.accumulate(marks)
    previous = np.r_[-1, seen[:-1]]  # nearest matched strictly before, in scan order (scan index)
    distance = np.arange(n) - previous
    same = (previous >= 0) & (sentence[index[np.maximum(previous, 0)]] == sentence[index])
    out = np.column_stack([same & (distance <= d) for d in DISTANCE_BUCKETS]).reshape(n, -1)
    return out if direction > 0 else out[::-1]


def _sentence_rank_features(b: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Per token: its sentence's share of the question's idf mass (distinct words) and that sentence's rank."""
    n_sentences = int(b.sentence.max()) + 1 if len(b.sentence) else 0
    hit = b.match_key >= 0
    keys = b.sentence[hit] * 4096 + b.match_key[hit]
    _, first = np.unique(keys, return_index=True)
    score = np.bincount(b.sentence[hit][first], weights=b.weight[hit][first], minlength=n_sentences)
    sentence_example = np.zeros(n_sentences, dtype=np.int64)
    sentence_example[b.sentence] = b.example
    order = np.lexsort((np.arange(n_sentences), -score, sentence_example))
    rank = np.empty(n_sentences, dtype=np.int64)
    first_of_example = np.searchsorted(sentence_example[order], sentence_example[order])
    rank[order] = np.arange(n_sentences) - first_of_example
    return score[b.sentence], rank[b.sentence]


def _sentence_bounds(sentence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First token and one past the last token of each token's sentence."""
    n = len(sentence)
    starts = np.flatnonzero(np.r_[True, sentence[1:] != sentence[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    first = np.repeat(starts, sizes)
    return first, np.repeat(starts + sizes, sizes)


@dataclass(frozen=True)
class _Context:
    """Per batch token: what the start and end features of `question_block` share."""

    k: np.ndarray  # token index in the batch
    matched: np.ndarray  # 1.0 where the token matches a question word
    bigram: np.ndarray  # 1.0 where tokens k-1, k match adjacent content words of the question
    s_first: np.ndarray  # first token of the token's sentence
    s_last: np.ndarray  # one past its last token
    after: np.ndarray  # idf of a matched question word that comes after the wh-word (else 0)
    before: np.ndarray  # ... that comes before it
    place: np.ndarray  # (T, QPOS_BUCKETS) one-hot place of a matched question word around the wh-word


def _context(b: Batch) -> _Context:
    k = np.arange(len(b.example))
    matched = (b.weight > 0).astype(float)
    s_first, s_last = _sentence_bounds(b.sentence)
    bigram = (matched > 0) & (np.r_[-2, b.match_key[:-1]] == b.match_key - 1) & (s_first < k)
    place = (b.place[:, None] == np.arange(sf.QPOS_BUCKETS)).astype(float)
    return _Context(k, matched, bigram.astype(float), s_first, s_last, b.weight * b.after,
                    b.weight * (1 - b.after), place)


def _start_features(b: Batch, x: _Context) -> np.ndarray:
    k, matched, s_first = x.k, x.matched, x.s_first
    score, rank = _sentence_rank_features(b)
    n_sentences = int(b.sentence.max(initial=0)) + 1
    sent_bigrams = np.minimum(np.bincount(b.sentence, weights=x.bigram, minlength=n_sentences)[b.sentence], 3) / 3
    left = _distance_buckets(matched > 0, b.sentence, 1)
    return np.column_stack([
        score, rank == 0, rank == 1, rank >= 2,
        _clipped_sum(b.weight, np.maximum(k - 10, b.first), np.minimum(k + 11, b.last)),
        _clipped_sum(matched, np.maximum(k - 1, b.first), k),
        _clipped_sum(matched, np.maximum(k - 3, b.first), k) > 0,
        _clipped_sum(x.bigram, np.maximum(k - 1, b.first), k) > 0, _clipped_sum(b.weight, s_first, k), sent_bigrams,
        left, left * b.form[:, None], _clipped_sum(x.before, s_first, k), _clipped_sum(x.after, s_first, k),
        _clipped_sum(x.before, np.maximum(k - 5, s_first), k), _clipped_sum(x.after, np.maximum(k - 5, s_first), k),
        _clipped_sum(b.focus, np.maximum(k - 2, s_first), k) > 0,
        # where the question's words sit around its wh-word (`_Context.place`), 1 / 3 tokens / the sentence left
        _window_sum(x.place, np.maximum(k - 1, s_first), k) > 0,
        _window_sum(x.place, np.maximum(k - 3, s_first), k) > 0, _window_sum(x.place, s_first, k) > 0,
    ]).astype(float)


def _end_features(b: Batch, x: _Context) -> np.ndarray:
    k, matched, s_last = x.k, x.matched, x.s_last
    right = _distance_buckets(matched > 0, b.sentence, -1)
    near = np.minimum(k + 6, s_last)
    return np.column_stack([
        _clipped_sum(matched, k + 1, np.minimum(k + 2, b.last)),
        _clipped_sum(matched, k + 1, np.minimum(k + 4, b.last)) > 0,
        _clipped_sum(x.bigram, k + 2, np.minimum(k + 3, b.last)) > 0, _clipped_sum(b.weight, k + 1, s_last),
        right, right * b.form[:, None], _clipped_sum(x.after, k + 1, s_last), _clipped_sum(x.before, k + 1, s_last),
        _clipped_sum(x.after, k + 1, near), _clipped_sum(x.before, k + 1, near),
        _clipped_sum(b.focus, k + 1, np.minimum(k + 3, s_last)) > 0,
        _window_sum(x.place, k + 1, np.minimum(k + 2, s_last)) > 0,
        _window_sum(x.place, k + 1, np.minimum(k + 4, s_last)) > 0, _window_sum(x.place, k + 1, s_last) > 0,
    ]).astype(float)


def _head_ids(b: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Table ids of the question head crossed with the token before a start, after an end, and with each inside
    token's shape, word and suffix: "what year" likes 4-digit tokens, "who" x "by" the token after it."""
    lex, k = sf.LEXICAL_BUCKETS, np.arange(len(b.example))
    previous = np.where(k > b.first, b.word[np.maximum(k - 1, 0)], lex - 1)
    following = np.where(k + 1 < b.last, b.word[np.minimum(k + 1, len(k) - 1)], lex - 2)
    base = lex + sf.SUFFIX_BUCKETS
    inside = np.column_stack([base + (b.head * 7 + b.shape) % lex, base + lex + (b.head * 31 + b.word) % lex,
                              base + 2 * lex + (b.head * 17 + b.suffix) % lex])
    return (sf.PASSAGE_IDS_WIDTH + (b.head * 13 + previous) % lex,
            sf.PASSAGE_IDS_WIDTH + (b.head * 19 + following) % lex, inside)


def question_block(b: Batch) -> tuple[np.ndarray, ...]:
    """Question-dependent features of every batch token: dense start, end and inside features, then the table
    ids that cross the question head with the passage (`_head_ids`)."""
    x = _context(b)
    inside = np.column_stack([x.matched, b.weight, b.focus])
    return (_start_features(b, x), _end_features(b, x), inside, *_head_ids(b))


def _typed(scores: np.ndarray, qtype: np.ndarray) -> np.ndarray:
    """Shared column plus the token's own question-type column."""
    return scores[:, 0] + scores[np.arange(len(qtype)), 1 + qtype]


def _typed_lookup(table: np.ndarray, ids: np.ndarray, qtype: np.ndarray) -> np.ndarray:
    """Sum over a token's id columns of the shared plus its type's table entry."""
    return (table[ids, 0] + table[ids, 1 + qtype[:, None]]).sum(1)


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # per span
    spans: Spans
    features: dict[str, tuple[np.ndarray, np.ndarray]]  # role -> (dense features, table ids) per token


def _role_features(b: Batch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    start_q, end_q, inside_q, start_head, end_head, inside_head = question_block(b)
    return {"start": (np.hstack([b.start, start_q]), np.column_stack([b.start_ids, start_head])),
            "end": (np.hstack([b.end, end_q]), np.column_stack([b.end_ids, end_head])),
            "inside": (np.hstack([b.inside, inside_q]), np.column_stack([b.word, b.suffix, inside_head]))}


def score_batch(b: Batch, w: Weights, max_span_tokens: int) -> Scored:
    features = _role_features(b)
    token = {role: _typed(dense @ w.blocks[role], b.qtype) + _typed_lookup(w.blocks[f"{role}_ids"], ids, b.qtype)
             for role, (dense, ids) in features.items()}
    c = np.concatenate([[0.0], np.cumsum(token["inside"])])
    s = spans(b, max_span_tokens)
    length = _typed(w.blocks["length"][s.j - s.i], b.qtype[s.i])
    return Scored(token["start"][s.i] + token["end"][s.j] + c[s.j + 1] - c[s.i] + length, s, features)


def _segment_logsumexp(values: np.ndarray, segment_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-segment log-sum-exp, exp(values - segment max) per element)."""
    top = np.maximum.reduceat(values, segment_start)
    sizes = np.diff(np.r_[segment_start, len(values)])
    exp = np.exp(values - np.repeat(top, sizes))
    return top + np.log(np.add.reduceat(exp, segment_start)), exp


def batch_loss(b: Batch, w: Weights, max_span_tokens: int, *, want_gradient: bool = True
               ) -> tuple[np.ndarray, Gradient | None]:
    """Per-example -log P(gold spans) under each example's span softmax, and the exact gradient of their sum."""
    scored = score_batch(b, w, max_span_tokens)
    s, sizes = scored.spans, np.diff(np.r_[scored.spans.segment_start, len(scored.scores)])
    log_z, exp = _segment_logsumexp(scored.scores, s.segment_start)
    gold_scores = np.where(s.gold, scored.scores, -np.inf)
    log_gold, gold_exp = _segment_logsumexp(gold_scores, s.segment_start)
    losses = log_z - log_gold
    if not want_gradient:
        return losses, None
    g = np.exp(scored.scores - np.repeat(log_z, sizes)) - np.exp(gold_scores - np.repeat(log_gold, sizes))
    return losses, _gradient(b, scored, g, max_span_tokens)


def _typed_mass(mass: np.ndarray, qtype: np.ndarray) -> np.ndarray:
    out = np.zeros((len(mass), TYPES))
    out[:, 0] = mass
    out[np.arange(len(mass)), 1 + qtype] = mass
    return out


@dataclass(frozen=True)
class Gradient:
    """Dense blocks, and the table blocks as (touched rows, their gradient): a minibatch touches few table rows."""

    dense: dict[str, np.ndarray]
    tables: dict[str, tuple[np.ndarray, np.ndarray]]

    def scaled(self, factor: float) -> "Gradient":
        return Gradient({k: v * factor for k, v in self.dense.items()},
                        {k: (rows, v * factor) for k, (rows, v) in self.tables.items()})

    def as_dense(self, w: Weights) -> dict[str, np.ndarray]:
        out = dict(self.dense)
        for k, (rows, values) in self.tables.items():
            out[k] = np.zeros_like(w.blocks[k])
            out[k][rows] = values
        return out


def _table_gradient(ids: np.ndarray, mass: np.ndarray, qtype: np.ndarray, table_rows: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """d loss / d table for one-hot id columns: each id collects its token's mass in column 0 and 1 + type."""
    present = np.bincount(ids.ravel(), minlength=table_rows) > 0
    rows = np.flatnonzero(present)
    local = (np.cumsum(present) - 1)[ids]
    weights = np.repeat(mass, ids.shape[1])
    keys = np.concatenate([(local * TYPES).ravel(), (local * TYPES + 1 + qtype[:, None]).ravel()])
    flat = np.bincount(keys, weights=np.concatenate([weights, weights]), minlength=len(rows) * TYPES)
    return rows, flat.reshape(len(rows), TYPES)


def _gradient(b: Batch, scored: Scored, g: np.ndarray, max_span_tokens: int) -> Gradient:
    n = len(b.example)
    i, j = scored.spans.i, scored.spans.j
    inside = np.cumsum(np.bincount(i, weights=g, minlength=n + 1) - np.bincount(j + 1, weights=g, minlength=n + 1))
    mass = {"start": np.bincount(i, weights=g, minlength=n), "end": np.bincount(j, weights=g, minlength=n),
            "inside": inside[:n]}
    dense = {"length": _length_gradient(j - i, g, b.qtype[i], max_span_tokens)}
    tables = {}
    for role, (features, ids) in scored.features.items():
        dense[role] = features.T @ _typed_mass(mass[role], b.qtype)
        tables[f"{role}_ids"] = _table_gradient(ids, mass[role], b.qtype, TABLE_ROWS[role])
    return Gradient(dense, tables)


def _length_gradient(length: np.ndarray, g: np.ndarray, qtype: np.ndarray, max_span_tokens: int) -> np.ndarray:
    flat = np.bincount(length * TYPES + 1 + qtype, weights=g, minlength=max_span_tokens * TYPES)
    out = flat.reshape(max_span_tokens, TYPES)
    out[:, 0] = np.bincount(length, weights=g, minlength=max_span_tokens)
    return out


def mean_loss(c: Corpus, w: Weights, max_span_tokens: int, batch_size: int = 256) -> float:
    losses = [batch_loss(batch(c, np.arange(k, min(k + batch_size, len(c))), max_span_tokens), w, max_span_tokens,
                         want_gradient=False)[0] for k in range(0, len(c), batch_size)]
    return float(np.mean(np.concatenate(losses)))


def predict_spans(c: Corpus, w: Weights, max_span_tokens: int) -> list[tuple[int, int, float] | None]:
    """Best (start token, end token, score) of each question of `c`, in order; None where the passage has no
    span."""
    b = batch(c, np.arange(len(c)), max_span_tokens)
    scored = score_batch(b, w, max_span_tokens)
    s = scored.spans
    best: list[tuple[int, int] | None] = [None] * len(c)
    if len(s.i):
        top = np.maximum.reduceat(scored.scores, s.segment_start)
        sizes = np.diff(np.r_[s.segment_start, len(s.i)])
        winners = np.flatnonzero(scored.scores == np.repeat(top, sizes))
        for k in winners[np.r_[True, s.example[winners][1:] != s.example[winners][:-1]]]:
            best[int(s.example[k])] = (int(s.i[k] - b.first[s.i[k]]), int(s.j[k] - b.first[s.i[k]]),
                                       float(scored.scores[k]))
    return best


@dataclass(frozen=True)
class StepReport:
    step: int
    epoch: int
    train_loss: float
    val_loss: float | None
    epoch_end: bool


def _adam_update(params: np.ndarray, gradient: np.ndarray, m: np.ndarray, v: np.ndarray, step: int,
                 learning_rate: float) -> np.ndarray:
    """New (params, m, v) rows after one Adam step; m and v are updated in place."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m *= beta1
    m += (1 - beta1) * gradient
    v *= beta2
    v += (1 - beta2) * gradient**2
    return params - learning_rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)


def _adam(w: Weights, grads: Gradient, state: dict, step: int, learning_rate: float, l2: float) -> None:
    """Adam with L2; table blocks are updated lazily, only in the rows this minibatch touched."""
    for k, params in w.blocks.items():
        if ("m", k) not in state:
            state["m", k], state["v", k] = np.zeros_like(params), np.zeros_like(params)
        m, v = state["m", k], state["v", k]
        if k in grads.tables:
            rows, gradient = grads.tables[k]
            m_rows, v_rows = m[rows], v[rows]
            params[rows] = _adam_update(params[rows], gradient + l2 * params[rows], m_rows, v_rows, step,
                                        learning_rate)
            m[rows], v[rows] = m_rows, v_rows
        else:
            params[:] = _adam_update(params, grads.dense[k] + l2 * params, m, v, step, learning_rate)


def _average_into(mean: Weights, w: Weights, count: int) -> None:
    """mean <- running mean of the `count` weight snapshots so far (the newest is `w`)."""
    for k, block in mean.blocks.items():
        block += (w.blocks[k] - block) / count


def steps_for(examples: int, epochs: int, batch_size: int) -> int:
    """How many steps `train` takes: every epoch walks the examples in batches, the last one possibly short."""
    return epochs * math.ceil(examples / batch_size)


def train(train_set: Corpus, val_set: Corpus | None, start: Weights, *, epochs: int, learning_rate: float,
          batch_size: int, seed: int, eval_every_steps: int, max_span_tokens: int, l2: float = 1e-3,
          average_every: int = 0) -> Iterator[tuple[StepReport, Weights]]:
    """Adam over minibatches of questions; yields after every step so the caller can stream losses, and always
    measures val_loss at the end of an epoch so per-epoch checkpoints can be compared. `average_every` > 0:
    the yielded model is the mean of the weights taken every that many steps and at each epoch's end (Polyak
    averaging: minibatch noise in the rarely-seen lexical rows averages out); the latest weights until then."""
    rng = np.random.default_rng(seed)
    w, state, step, snapshots = start.copy(), {}, 0, 0
    mean = start.copy()
    for epoch in range(epochs):
        order = rng.permutation(len(train_set))
        for begin in range(0, len(order), batch_size):
            chosen = np.sort(order[begin: begin + batch_size])
            losses, grads = batch_loss(batch(train_set, chosen, max_span_tokens), w, max_span_tokens)
            step += 1
            _adam(w, grads.scaled(1.0 / len(chosen)), state, step, learning_rate, l2)
            epoch_end = begin + batch_size >= len(order)
            if average_every and (step % average_every == 0 or epoch_end):
                snapshots += 1
                _average_into(mean, w, snapshots)
            model = mean if snapshots else w
            val = None
            if val_set is not None and len(val_set) and (step % eval_every_steps == 0 or epoch_end):
                val = mean_loss(val_set, model, max_span_tokens)
            yield StepReport(step, epoch, float(np.mean(losses)), val, epoch_end), model


def answer(p: sf.Passage, question: str, idf: dict[str, float], w: Weights, max_span_tokens: int) -> str:
    """The best span's text; "" when the context has no candidate span (empty, or punctuation only)."""
    return scored_answer(p, question, idf, w, max_span_tokens)[0]


def scored_answer(p: sf.Passage, question: str, idf: dict[str, float], w: Weights, max_span_tokens: int
                  ) -> tuple[str, float]:
    """The best span's text and score (-inf with "" when the passage has no candidate span), so the answers of
    a long context's windows can be compared."""
    if not len(p.sentence):
        return "", float("-inf")
    q = sf.question(question, p, idf, (), max_span_tokens)
    best = predict_spans(build_corpus([p], [(0, q)]), w, max_span_tokens)[0]
    if best is None:
        return "", float("-inf")
    return p.text[p.offsets[best[0], 0]: p.offsets[best[1], 1]], best[2]

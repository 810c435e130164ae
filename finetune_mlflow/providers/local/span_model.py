"""The local provider's model: a linear extractive span ranker, trained by SGD on this machine (numpy only).

A span (i..j) inside one sentence of the context scores
    s(i, j) = start(i) + end(j) + sum_{k=i..j} inside(k) + length(j - i)
where each term is a dot product of hand-made token features with weights, and every weight block is repeated
per question type (who/when/how many...) so that "when" can learn to like years and "who" capitalized words.
Because the score decomposes over tokens, every span of a passage is scored with a few vector operations and the
softmax gradient over all spans is exact (no candidate sampling). The loss is the negative log of the
probability mass on the gold spans.

"Base" is the hand-set initial weights (a sensible heuristic: near question words, in the best-matching
sentence, not repeating the question); tuning starts from it, so the tuned model's gain is the learning.
Pure functions and plain data: no MLflow, no files, no network.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:[-'’]\w+)*|[^\w\s]", re.UNICODE)
STOPWORDS = frozenset(
    "a an the of in on at by for to from with and or but is are was were be been being as that this these those "
    "it its it's which who whom whose what when where why how did do does done has have had not no than then "
    "there their they he she his her him i we you our your into over under about after before during between "
    "also such can could would should may might will shall one s 's".split()
)
_MONTHS = frozenset("january february march april may june july august september october november december".split())
_NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred thousand "
    "million billion trillion percent half dozen".split()
)
FUNCTION_WORDS = (
    "in", "of", "by", "the", "a", "an", "was", "is", "to", "as", "on", "at", "from", "for", "and", "with",
    "called", "known", "that", "which", "(", ",", ".", "'s", '"', "were", "are", "be", "or", "named",
)
_FUNCTION_INDEX = {word: index for index, word in enumerate(FUNCTION_WORDS)}
QUESTION_TYPES = ("who", "when", "where", "why", "number", "how", "what", "other")


def question_type(question: str) -> int:
    words = question.lower().split()
    text = " ".join(words)
    if re.search(r"\bhow (many|much|long|old|far|large|big|tall)\b|\bwhat (percentage|percent|number|amount)\b",
                 text):
        return QUESTION_TYPES.index("number")
    if re.search(r"\bwhen\b|\bwhat (year|century|decade|day|month|date|time|period)\b|\bwhich year\b", text):
        return QUESTION_TYPES.index("when")
    for word in words:
        stripped = word.strip("?,.\"'")
        if stripped in ("who", "whom", "whose"):
            return QUESTION_TYPES.index("who")
        if stripped in ("where", "why", "how"):
            return QUESTION_TYPES.index(stripped)
        if stripped in ("what", "which"):
            return QUESTION_TYPES.index("what")
    return QUESTION_TYPES.index("other")


def stem(word: str) -> str:
    word = word.lower()
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


@dataclass(frozen=True)
class Passage:
    """A tokenized context with its candidate spans; independent of the question, so cached per context."""

    text: str
    offsets: np.ndarray  # (n, 2) char start/end of each token
    lower: tuple[str, ...]
    lower_raw: tuple[str, ...]  # original casing, for shapes
    stems: tuple[str, ...]
    sentence: np.ndarray  # (n,) sentence index of each token
    n_sentences: int
    static_start: np.ndarray  # (n, k) question-independent token features
    static_end: np.ndarray
    static_inside: np.ndarray
    span_start: np.ndarray  # (m,) candidate span first token
    span_end: np.ndarray  # (m,) candidate span last token (inclusive)
    # Hashed word ids per token for the lexical tables: (n, 2) start [prev word, word], end [next word, word],
    # (n, 1) inside [word].
    lex_start: np.ndarray
    lex_end: np.ndarray
    lex_inside: np.ndarray


def _shift(values: np.ndarray, by: int, fill: float = 0.0) -> np.ndarray:
    """values[k - by] at position k (by > 0 looks left), padded with `fill`."""
    out = np.full_like(values, fill)
    if by > 0:
        out[by:] = values[:-by]
    elif by < 0:
        out[:by] = values[-by:]
    else:
        out[:] = values
    return out


LEXICAL_BUCKETS = 1 << 12


def _hashed(words: Sequence[str], salt: str) -> np.ndarray:
    """Stable (crc32, not Python's salted hash) bucket ids, so saved weights mean the same in every process."""
    return np.array([zlib.crc32(f"{salt}{w}".encode()) % LEXICAL_BUCKETS for w in words], dtype=np.int64)


def _one_hot_words(words: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(words), len(FUNCTION_WORDS) + 1))
    for row, word in enumerate(words):
        out[row, _FUNCTION_INDEX.get(word, len(FUNCTION_WORDS))] = 1.0
    return out


@lru_cache(maxsize=4096)
def passage(text: str, max_span_tokens: int) -> Passage:
    matches = list(_TOKEN.finditer(text))
    tokens = [m.group(0) for m in matches]
    n = len(tokens)
    lower = tuple(t.lower() for t in tokens)
    offsets = np.array([[m.start(), m.end()] for m in matches], dtype=np.int64).reshape(n, 2)
    sentence = np.zeros(n, dtype=np.int64)
    current = 0
    for k, token in enumerate(tokens):
        sentence[k] = current
        if token in (".", "?", "!") and (k + 1 == n or tokens[k + 1][:1].isupper() or tokens[k + 1] in ('"', "(")):
            current += 1
    is_punct = np.array([not t[0].isalnum() for t in tokens], dtype=float)
    is_cap = np.array([t[0].isupper() for t in tokens], dtype=float)
    is_digit = np.array([t[0].isdigit() for t in tokens], dtype=float)
    is_year = np.array([bool(re.fullmatch(r"1\d{3}|20\d{2}", t)) for t in tokens], dtype=float)
    is_stop = np.array([w in STOPWORDS for w in lower], dtype=float)
    is_month = np.array([w in _MONTHS for w in lower], dtype=float)
    is_number_word = np.array([w in _NUMBER_WORDS for w in lower], dtype=float)
    first_of_sentence = np.r_[1.0, (sentence[1:] != sentence[:-1]).astype(float)] if n else np.zeros(0)
    prev_words = ("<s>",) + lower[:-1] if n else ()
    next_words = lower[1:] + ("</s>",) if n else ()
    prev_punct, next_punct = _shift(is_punct, 1, 1.0), _shift(is_punct, -1, 1.0)
    ones = np.ones(n)
    static_start = np.column_stack([
        ones, is_cap, is_digit, is_stop, is_year, is_month, first_of_sentence, prev_punct,
        _shift(is_cap, 1), _one_hot_words(prev_words),
    ])
    static_end = np.column_stack([
        ones, is_cap, is_digit, is_stop, is_year, is_month, next_punct, _shift(is_cap, -1),
        _one_hot_words(next_words),
    ])
    static_inside = np.column_stack([ones, is_cap, is_digit, is_stop, is_year, is_month, is_punct, is_number_word])
    starts, ends = [], []
    for length in range(max_span_tokens):
        i = np.arange(0, max(n - length, 0))
        j = i + length
        ok = (sentence[i] == sentence[j]) & (is_punct[i] == 0) & (is_punct[j] == 0)
        starts.append(i[ok])
        ends.append(j[ok])
    return Passage(
        text=text, offsets=offsets, lower=lower, lower_raw=tuple(tokens), stems=tuple(stem(w) for w in lower), sentence=sentence,
        n_sentences=int(sentence.max()) + 1 if n else 0, static_start=static_start, static_end=static_end,
        static_inside=static_inside,
        span_start=np.concatenate(starts) if starts else np.zeros(0, np.int64),
        span_end=np.concatenate(ends) if ends else np.zeros(0, np.int64),
        lex_start=np.column_stack([_hashed(prev_words, "p:"), _hashed(lower, "s:")]).reshape(n, 2),
        lex_end=np.column_stack([_hashed(next_words, "n:"), _hashed(lower, "e:")]).reshape(n, 2),
        lex_inside=_hashed(lower, "i:").reshape(n, 1),
    )


# Question-dependent features appended to the static ones (names kept for the heuristic's initial weights).
DISTANCE_BUCKETS = (1, 2, 3, 6, 10)
START_DYNAMIC = ("sent_score", "sent_best", "sent_second", "sent_far", "window", "match_left1", "match_left3",
                 "prev_match") + tuple(f"left_match<={d}" for d in DISTANCE_BUCKETS)
END_DYNAMIC = ("match_right1", "match_right3", "next_match") + tuple(f"right_match<={d}" for d in DISTANCE_BUCKETS)
INSIDE_DYNAMIC = ("q_match", "q_match_idf")
STATIC_START_NAMES = ("bias", "cap", "digit", "stop", "year", "month", "first", "prev_punct", "prev_cap") + tuple(
    f"prev={w}" for w in FUNCTION_WORDS) + ("prev=other",)
STATIC_END_NAMES = ("bias", "cap", "digit", "stop", "year", "month", "next_punct", "next_cap") + tuple(
    f"next={w}" for w in FUNCTION_WORDS) + ("next=other",)
STATIC_INSIDE_NAMES = ("length", "cap", "digit", "stop", "year", "month", "punct", "number_word")
START_NAMES = STATIC_START_NAMES + START_DYNAMIC
END_NAMES = STATIC_END_NAMES + END_DYNAMIC
INSIDE_NAMES = STATIC_INSIDE_NAMES + INSIDE_DYNAMIC


@dataclass(frozen=True)
class Features:
    passage: Passage
    qtype: int
    start: np.ndarray
    end: np.ndarray
    inside: np.ndarray
    # Per-question inside ids: the passage's word ids plus (question head, token shape) ids.
    lex_inside: np.ndarray


def _near(indicator: np.ndarray, direction: int, distance: int) -> np.ndarray:
    """1 where a matched token lies within `distance` tokens in `direction` (+1: left, -1: right)."""
    out = np.zeros_like(indicator)
    for d in range(1, distance + 1):
        out = np.maximum(out, _shift(indicator, d * direction))
    return out


def _window_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum of values[k - radius .. k + radius] at each k (clipped at the ends), for any length."""
    padded = np.concatenate([[0.0], np.cumsum(values)])
    k = np.arange(len(values))
    return padded[np.minimum(k + radius + 1, len(values))] - padded[np.maximum(k - radius, 0)]


def _distance_to_match(matched: np.ndarray, sentence: np.ndarray, direction: int) -> np.ndarray:
    """Tokens to the nearest matched token on one side (+1: left, -1: right) in the same sentence; large if none."""
    n = len(matched)
    distance = np.full(n, 10_000.0)
    last, last_sentence = None, None
    positions = range(n) if direction > 0 else range(n - 1, -1, -1)
    for k in positions:
        if last is not None and last_sentence == sentence[k]:
            distance[k] = abs(k - last)
        if matched[k]:
            last, last_sentence = k, sentence[k]
    return distance


def _buckets(distance: np.ndarray) -> np.ndarray:
    return np.column_stack([distance <= d for d in DISTANCE_BUCKETS]).reshape(len(distance), -1)


def _shape(token: str) -> str:
    if token.isdigit():
        return "dddd" if len(token) == 4 else "d"
    if token[:1].isdigit():
        return "d."
    if token[:1].isupper():
        return "Xx"
    return "x" if token[:1].isalpha() else "."


def question_head(question: str) -> str:
    """The word that says what is asked for ("year" in "what year", "many" in "how many"), else the wh-word."""
    words = [w.lower() for w in _TOKEN.findall(question)]
    for index, word in enumerate(words):
        if word in ("what", "which", "how", "who", "when", "where", "why", "whose", "whom"):
            following = [w for w in words[index + 1:] if w not in ("the", "a", "an", "is", "was", "of", "did")]
            return f"{word} {following[0]}" if following and word in ("what", "which", "how") else word
    return words[0] if words else ""


def features(question: str, context: str, idf: dict[str, float], max_span_tokens: int) -> Features:
    p = passage(context, max_span_tokens)
    n = len(p.lower)
    q_stems = {stem(w) for w in _TOKEN.findall(question.lower()) if w not in STOPWORDS and w[0].isalnum()}
    weights = np.array([idf.get(s, 1.0) if s in q_stems else 0.0 for s in p.stems]) if n else np.zeros(0)
    matched = (weights > 0).astype(float)
    # Sentence overlap: idf mass of distinct question words the sentence contains.
    sentence_score = np.zeros(max(p.n_sentences, 1))
    # Sorted: float sums in set order would depend on PYTHONHASHSEED and make training irreproducible.
    for s_index, s in sorted({(int(p.sentence[k]), p.stems[k]) for k in np.flatnonzero(matched)}):
        sentence_score[s_index] += idf.get(s, 1.0)
    total = sum(idf.get(s, 1.0) for s in sorted(q_stems)) or 1.0
    sentence_score = sentence_score / total
    order = np.argsort(-sentence_score, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    token_rank = rank[p.sentence] if n else np.zeros(0, np.int64)
    window = _window_sum(weights, 10) / total
    start_dynamic = np.column_stack([
        sentence_score[p.sentence] if n else np.zeros(0), (token_rank == 0), (token_rank == 1), (token_rank >= 2),
        window, _shift(matched, 1), _near(matched, 1, 3), _shift(matched, 1),
        _buckets(_distance_to_match(matched, p.sentence, 1)),
    ]).astype(float)
    end_dynamic = np.column_stack([_shift(matched, -1), _near(matched, -1, 3), _shift(matched, -1),
                                   _buckets(_distance_to_match(matched, p.sentence, -1))]).astype(float)
    head = question_head(question)
    head_shape = _hashed([f"{head}|{_shape(t)}" for t in p.lower_raw], "h:")
    inside_dynamic = np.column_stack([matched, weights / total])
    return Features(
        passage=p, qtype=question_type(question),
        start=np.hstack([p.static_start, start_dynamic.reshape(n, -1)]),
        end=np.hstack([p.static_end, end_dynamic.reshape(n, -1)]),
        inside=np.hstack([p.static_inside, inside_dynamic.reshape(n, -1)]),
        lex_inside=np.column_stack([p.lex_inside, head_shape]).reshape(n, 2),
    )


@dataclass
class Weights:
    """One row of weights shared by all question types plus one row per type, for each feature role."""

    start: np.ndarray  # (1 + n_types, len(START_NAMES))
    end: np.ndarray
    inside: np.ndarray
    length: np.ndarray  # (1 + n_types, max_span_tokens)
    lex_start: np.ndarray  # (1 + n_types, LEXICAL_BUCKETS)
    lex_end: np.ndarray
    lex_inside: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"start": self.start, "end": self.end, "inside": self.inside, "length": self.length,
                "lex_start": self.lex_start, "lex_end": self.lex_end, "lex_inside": self.lex_inside}

    def copy(self) -> "Weights":
        return Weights(**{k: v.copy() for k, v in self.arrays().items()})


def initial_weights(max_span_tokens: int) -> Weights:
    """The base model: a reading-comprehension heuristic, also the point tuning starts from."""
    rows = 1 + len(QUESTION_TYPES)
    w = Weights(
        start=np.zeros((rows, len(START_NAMES))), end=np.zeros((rows, len(END_NAMES))),
        inside=np.zeros((rows, len(INSIDE_NAMES))), length=np.zeros((rows, max_span_tokens)),
        lex_start=np.zeros((rows, LEXICAL_BUCKETS)), lex_end=np.zeros((rows, LEXICAL_BUCKETS)),
        lex_inside=np.zeros((rows, LEXICAL_BUCKETS)),
    )

    def put(block: np.ndarray, names: tuple[str, ...], name: str, value: float, qtype: str | None = None) -> None:
        block[0 if qtype is None else 1 + QUESTION_TYPES.index(qtype), names.index(name)] = value

    for name, value in (("sent_best", 2.0), ("sent_score", 2.0), ("window", 1.0), ("match_left3", 0.5),
                        ("stop", -1.0)):
        put(w.start, START_NAMES, name, value)
    for name, value in (("match_right3", 0.3), ("stop", -1.0), ("next_punct", 0.3)):
        put(w.end, END_NAMES, name, value)
    for name, value in (("q_match", -3.0), ("length", -0.1), ("stop", -0.2)):
        put(w.inside, INSIDE_NAMES, name, value)
    put(w.inside, INSIDE_NAMES, "year", 1.5, "when")
    put(w.inside, INSIDE_NAMES, "month", 1.0, "when")
    put(w.inside, INSIDE_NAMES, "digit", 1.5, "number")
    put(w.inside, INSIDE_NAMES, "number_word", 1.0, "number")
    put(w.inside, INSIDE_NAMES, "cap", 0.5, "who")
    put(w.inside, INSIDE_NAMES, "cap", 0.3, "where")
    w.length[0, : min(3, max_span_tokens)] = 0.3
    return w


def span_scores(f: Features, w: Weights) -> np.ndarray:
    t = 1 + f.qtype
    p = f.passage
    a = f.start @ (w.start[0] + w.start[t]) + (w.lex_start[0] + w.lex_start[t])[p.lex_start].sum(1)
    b = f.end @ (w.end[0] + w.end[t]) + (w.lex_end[0] + w.lex_end[t])[p.lex_end].sum(1)
    inside = f.inside @ (w.inside[0] + w.inside[t]) + (w.lex_inside[0] + w.lex_inside[t])[f.lex_inside].sum(1)
    c = np.concatenate([[0.0], np.cumsum(inside)])
    i, j = p.span_start, p.span_end
    return a[i] + b[j] + c[j + 1] - c[i] + (w.length[0] + w.length[t])[j - i]


def predict_span(f: Features, w: Weights) -> str:
    p = f.passage
    if len(p.span_start) == 0:
        return ""
    best = int(np.argmax(span_scores(f, w)))
    return p.text[p.offsets[p.span_start[best], 0]: p.offsets[p.span_end[best], 1]]


def gold_spans(f: Features, answers: Sequence[str]) -> np.ndarray:
    """Indices of candidate spans whose tokens equal a gold answer's tokens (every occurrence counts)."""
    p = f.passage
    targets = {tuple(t.lower() for t in _TOKEN.findall(answer)) for answer in answers}
    by_length: dict[int, set[tuple[str, ...]]] = {}
    for target in targets:
        if target:
            by_length.setdefault(len(target), set()).add(target)
    lengths = p.span_end - p.span_start + 1
    hits = [
        k for k in np.flatnonzero(np.isin(lengths, list(by_length)))
        if p.lower[p.span_start[k]: p.span_end[k] + 1] in by_length[int(lengths[k])]
    ]
    return np.array(hits, dtype=np.int64)


def loss_and_gradient(f: Features, gold: np.ndarray, w: Weights, *, want_gradient: bool = True
                      ) -> tuple[float, Weights | None]:
    """-log P(gold spans) under the span softmax, and its exact gradient."""
    scores = span_scores(f, w)
    shift = scores.max()
    exp = np.exp(scores - shift)
    z = exp.sum()
    gold_mass = exp[gold].sum()
    loss = float(math.log(z) - math.log(gold_mass))
    if not want_gradient:
        return loss, None
    g = exp / z
    g[gold] -= exp[gold] / gold_mass
    p = f.passage
    n = len(p.lower)
    i, j = p.span_start, p.span_end
    by_start = np.bincount(i, weights=g, minlength=n)
    by_end = np.bincount(j, weights=g, minlength=n)
    inside = np.cumsum(np.bincount(i, weights=g, minlength=n + 1) - np.bincount(j + 1, weights=g, minlength=n + 1))[:n]
    by_length = np.bincount(j - i, weights=g, minlength=w.length.shape[1])
    grads = Weights(**{k: np.zeros_like(v) for k, v in w.arrays().items()})
    lexical = (
        (grads.lex_start, p.lex_start, by_start), (grads.lex_end, p.lex_end, by_end),
        (grads.lex_inside, f.lex_inside, inside),
    )
    for row in (0, 1 + f.qtype):
        grads.start[row] += f.start.T @ by_start
        grads.end[row] += f.end.T @ by_end
        grads.inside[row] += f.inside.T @ inside
        grads.length[row] += by_length
        for table, ids, mass in lexical:
            table[row] += np.bincount(ids.ravel(), weights=np.repeat(mass, ids.shape[1]), minlength=LEXICAL_BUCKETS)
    return loss, grads


def document_frequencies(contexts: Sequence[str], max_span_tokens: int) -> dict[str, float]:
    """Smoothed idf of word stems over distinct training passages: rare shared words locate answers."""
    unique = list(dict.fromkeys(contexts))
    counts: dict[str, int] = {}
    for context in unique:
        for s in set(passage(context, max_span_tokens).stems):
            counts[s] = counts.get(s, 0) + 1
    total = len(unique)
    return {s: math.log((1 + total) / (1 + c)) + 1.0 for s, c in counts.items()}


@dataclass(frozen=True)
class StepReport:
    step: int
    epoch: int
    train_loss: float
    val_loss: float | None


def mean_loss(examples: Sequence[tuple[Features, np.ndarray]], w: Weights) -> float:
    return float(np.mean([loss_and_gradient(f, gold, w, want_gradient=False)[0] for f, gold in examples]))


def train(
    train_examples: Sequence[tuple[Features, np.ndarray]],
    val_examples: Sequence[tuple[Features, np.ndarray]],
    start: Weights,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    eval_every_steps: int,
    l2: float = 1e-4,
) -> Iterator[tuple[StepReport, Weights]]:
    """Adam over minibatches of questions; yields after every step so the caller can stream losses."""
    rng = np.random.default_rng(seed)
    w = start.copy()
    moments = {k: np.zeros_like(v) for k, v in w.arrays().items()}
    squares = {k: np.zeros_like(v) for k, v in w.arrays().items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    steps_per_epoch = math.ceil(len(train_examples) / batch_size)
    total_steps = steps_per_epoch * epochs
    for epoch in range(epochs):
        order = rng.permutation(len(train_examples))
        for begin in range(0, len(order), batch_size):
            batch = [train_examples[k] for k in order[begin: begin + batch_size]]
            total = {k: np.zeros_like(v) for k, v in w.arrays().items()}
            losses = []
            for f, gold in batch:
                loss, grads = loss_and_gradient(f, gold, w)
                losses.append(loss)
                for k, v in grads.arrays().items():
                    total[k] += v
            step += 1
            params = w.arrays()
            for k in params:
                gradient = total[k] / len(batch) + l2 * params[k]
                moments[k] = beta1 * moments[k] + (1 - beta1) * gradient
                squares[k] = beta2 * squares[k] + (1 - beta2) * gradient**2
                m_hat = moments[k] / (1 - beta1**step)
                v_hat = squares[k] / (1 - beta2**step)
                params[k] -= learning_rate * m_hat / (np.sqrt(v_hat) + eps)
            val = None
            if val_examples and (step % eval_every_steps == 0 or step == total_steps):
                val = mean_loss(val_examples, w)
            yield StepReport(step, epoch, float(np.mean(losses)), val), w

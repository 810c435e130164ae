"""A featurized question set in a few flat arrays, and the minibatches drawn from it.

Passages are stored once however many questions share them (token rows of three sparse matrices); questions are
ragged slices of flat arrays. A `Batch` concatenates its examples' tokens so a few matrix products, table lookups and
vector operations score every candidate span of every example at once. Token features are binary (uint8) or ids
into weight tables (one-hot, stored as the id): nothing of size tokens x vocabulary is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from finetune_mlflow.providers.local.span_features import Passage, Question


def _ragged(parts: Sequence[np.ndarray], dtype, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list of arrays."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    shape = (0, width) if width else (0,)
    return (np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)), offsets


@dataclass(frozen=True)
class Corpus:
    start: np.ndarray  # (passage tokens, len(STATIC_START_NAMES)) uint8
    end: np.ndarray
    inside: np.ndarray
    start_ids: np.ndarray  # (passage tokens, 5) int32
    end_ids: np.ndarray
    suffix: np.ndarray
    token_offset: np.ndarray  # (P + 1,) first token row of each passage
    sentence: np.ndarray  # per token, sentence index within its passage
    punct: np.ndarray
    shape: np.ndarray
    word: np.ndarray
    passage_of: np.ndarray  # (Q,) passage of each question
    qtype: np.ndarray
    head: np.ndarray
    form: np.ndarray
    focus: np.ndarray  # (Q,) see Question.focus
    matched: np.ndarray  # flat, sliced by match_offset
    matched_stem: np.ndarray
    weight: np.ndarray
    after: np.ndarray
    place: np.ndarray
    match_offset: np.ndarray
    gold: np.ndarray  # (G, 2), sliced by gold_offset
    gold_offset: np.ndarray

    def __len__(self) -> int:
        return len(self.passage_of)


def build_corpus(passages: Sequence[Passage], questions: Iterable[tuple[int, Question]]) -> Corpus:
    """`questions` pairs each Question with the index of its passage in `passages`."""
    pairs = list(questions)
    qs = [q for _, q in pairs]
    matched, match_offset = _ragged([q.matched for q in qs], np.int32)
    gold, gold_offset = _ragged([q.gold for q in qs], np.int32, width=2)
    token_offset = np.zeros(len(passages) + 1, dtype=np.int64)
    token_offset[1:] = np.cumsum([len(p.sentence) for p in passages])

    def flat(name: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in passages]).astype(dtype, copy=False)

    return Corpus(
        start=flat("start", np.uint8), end=flat("end", np.uint8), inside=flat("inside", np.uint8),
        start_ids=flat("start_ids", np.int32), end_ids=flat("end_ids", np.int32), suffix=flat("suffix", np.int32),
        token_offset=token_offset,
        sentence=flat("sentence", np.int32), punct=flat("punct", bool), shape=flat("shape", np.int8),
        word=flat("word", np.int32), passage_of=np.array([k for k, _ in pairs], dtype=np.int32),
        qtype=np.array([q.qtype for q in qs], dtype=np.int8), head=np.array([q.head for q in qs], dtype=np.int32),
        form=np.array([q.form for q in qs], dtype=np.int8), focus=np.array([q.focus for q in qs], dtype=np.int32),
        matched=matched, matched_stem=_ragged([q.matched_stem for q in qs], np.int32)[0],
        weight=_ragged([q.weight for q in qs], np.float32)[0], after=_ragged([q.after for q in qs], np.int8)[0],
        place=_ragged([q.place for q in qs], np.int8)[0],
        match_offset=match_offset,
        gold=gold, gold_offset=gold_offset,
    )


@dataclass(frozen=True)
class Batch:
    """Examples laid end to end: token k of the batch belongs to example `example[k]`."""

    start: np.ndarray  # (T, k) binary static features
    end: np.ndarray
    inside: np.ndarray
    start_ids: np.ndarray  # (T, 5) ids into the start table
    end_ids: np.ndarray
    suffix: np.ndarray  # (T,) ids into the inside table
    example: np.ndarray  # (T,) example of each token
    first: np.ndarray  # (T,) first token of that example
    last: np.ndarray  # (T,) one past its last token
    sentence: np.ndarray  # (T,) sentence id, unique across the batch
    punct: np.ndarray
    shape: np.ndarray
    word: np.ndarray
    qtype: np.ndarray  # (T,) question type of each token's example
    head: np.ndarray  # (T,)
    form: np.ndarray  # (T,) see span_features.asks_object
    weight: np.ndarray  # (T,) idf share of the matched question word, 0 if none
    match_key: np.ndarray  # (T,) question word id of a matched token, -1 if none
    after: np.ndarray  # (T,) 1.0 where the matched question word comes after the wh-word
    place: np.ndarray  # (T,) place of the matched question word around the wh-word (Question.place), -1 if none
    focus: np.ndarray  # (T,) 1.0 where the token matches the question's focus noun (Question.focus)
    gold_key: np.ndarray  # span keys (start * max_len + length - 1) of gold spans
    n_examples: int


def _ranges(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenated aranges begin[k]..end[k]."""
    lengths = end - begin
    out = np.repeat(end - np.cumsum(lengths), lengths) + np.arange(lengths.sum())
    return out


def batch(c: Corpus, examples: np.ndarray, max_span_tokens: int) -> Batch:
    examples = np.asarray(examples, dtype=np.int64)
    p = c.passage_of[examples]
    lengths = c.token_offset[p + 1] - c.token_offset[p]
    rows = _ranges(c.token_offset[p], c.token_offset[p + 1])
    example = np.repeat(np.arange(len(examples)), lengths)
    base = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
    n_sent = np.array([c.sentence[c.token_offset[k + 1] - 1] + 1 if lengths[i] else 0 for i, k in enumerate(p)])
    sentence_base = np.r_[0, np.cumsum(n_sent)[:-1]].astype(np.int64)
    weight = np.zeros(len(rows), dtype=np.float64)
    match_key = np.full(len(rows), -1, dtype=np.int64)
    m = _ranges(c.match_offset[examples], c.match_offset[examples + 1])
    m_example = np.repeat(np.arange(len(examples)), c.match_offset[examples + 1] - c.match_offset[examples])
    weight[base[m_example] + c.matched[m]] = c.weight[m]
    match_key[base[m_example] + c.matched[m]] = c.matched_stem[m]
    after = np.zeros(len(rows))
    after[base[m_example] + c.matched[m]] = c.after[m]
    place = np.full(len(rows), -1, dtype=np.int64)
    place[base[m_example] + c.matched[m]] = c.place[m]
    g = _ranges(c.gold_offset[examples], c.gold_offset[examples + 1])
    g_example = np.repeat(np.arange(len(examples)), c.gold_offset[examples + 1] - c.gold_offset[examples])
    gold = c.gold[g].astype(np.int64)
    return Batch(
        start=c.start[rows], end=c.end[rows], inside=c.inside[rows], start_ids=c.start_ids[rows],
        end_ids=c.end_ids[rows], suffix=c.suffix[rows], example=example, first=base[example],
        last=(base + lengths)[example], sentence=c.sentence[rows] + sentence_base[example], punct=c.punct[rows],
        shape=c.shape[rows], word=c.word[rows], qtype=c.qtype[examples][example].astype(np.int64),
        head=c.head[examples][example].astype(np.int64), form=c.form[examples][example].astype(float),
        weight=weight, match_key=match_key, after=after, place=place,
        focus=((match_key >= 0) & (match_key == c.focus[examples][example])).astype(float),
        gold_key=(gold[:, 0] + base[g_example]) * max_span_tokens + gold[:, 1] - gold[:, 0],
        n_examples=len(examples),
    )


@dataclass(frozen=True)
class Spans:
    """Candidate spans of a batch, grouped by example: tokens i..j inside one sentence, no edge punctuation."""

    i: np.ndarray
    j: np.ndarray
    segment_start: np.ndarray  # first span of each example (every example has at least one)
    example: np.ndarray
    gold: np.ndarray  # bool per span


def spans(b: Batch, max_span_tokens: int) -> Spans:
    """Enumerated token by token, so they come out ordered by start token and hence grouped by example."""
    n = len(b.example)
    i = np.repeat(np.arange(n), max_span_tokens)
    j = i + np.tile(np.arange(max_span_tokens), n)
    inside = j < n
    j_safe = np.minimum(j, max(n - 1, 0))
    ok = inside & (b.sentence[i] == b.sentence[j_safe]) & ~b.punct[i] & ~b.punct[j_safe]
    i, j = i[ok], j[ok]
    example = b.example[i]
    segment_start = np.flatnonzero(np.r_[True, example[1:] != example[:-1]]) if len(i) else np.zeros(0, np.int64)
    gold = np.isin(i * max_span_tokens + j - i, b.gold_key)
    return Spans(i, j, segment_start, example, gold)

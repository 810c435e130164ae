"""Featurization for the local span ranker: text in, compact numpy/scipy.sparse arrays out.

Split in two so that memory grows with passages, not with questions x tokens:
- a passage (one distinct context) gets its question-independent token features once, as sparse rows;
- a question keeps only what depends on it: its type, its head word, which passage tokens match its words (with
  their idf) and its gold spans. The dense per-token question features are derived from those per minibatch
  (`span_model.question_block`), so nothing of size tokens x features is stored per question.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np

TOKEN = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:[-'’]\w+)*|[^\w\s]", re.UNICODE)
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
# The model's weight columns: the question types, with "what" split by form ("what did X sign" asks for the
# object, "what caused X" for the subject: the answer sits on opposite sides of the matched verb).
WEIGHT_TYPES = QUESTION_TYPES + ("what (object)",)
LEXICAL_BUCKETS = 1 << 13
_YEAR = re.compile(r"1\d{3}|20\d{2}")

# Question-independent token features: a binary dense block (names) and id columns into one table per role.
STATIC_START_NAMES = ("bias", "cap", "digit", "stop", "year", "month", "first", "prev_punct", "prev_cap")
STATIC_END_NAMES = ("bias", "cap", "digit", "stop", "year", "month", "next_punct", "next_cap")
STATIC_INSIDE_NAMES = ("length", "cap", "digit", "stop", "year", "month", "punct", "number_word")
FUNCTION_WIDTH = len(FUNCTION_WORDS) + 1
SUFFIX_BUCKETS = 1 << 11  # last three letters: a cheap stand-in for part of speech (-ion, -ed, -ly, 19-)
# start ids: [previous function word | previous word | word | suffix of previous | suffix | question head x
# previous word]; end: [next function word | next word | word | suffix of next | suffix | question head x next word];
# inside: [word | suffix | question head x token shape | question head x word | question head x suffix].
# The question head columns are added per question (span_model.question_block), after the passage's own.
PASSAGE_IDS_WIDTH = FUNCTION_WIDTH + 2 * LEXICAL_BUCKETS + 2 * SUFFIX_BUCKETS
START_IDS_WIDTH = END_IDS_WIDTH = PASSAGE_IDS_WIDTH + LEXICAL_BUCKETS
INSIDE_IDS_WIDTH = 4 * LEXICAL_BUCKETS + SUFFIX_BUCKETS


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


def weight_type(qtype: int, form: int) -> int:
    """Index into WEIGHT_TYPES of a question of type `qtype` and form `form` (see asks_object)."""
    return WEIGHT_TYPES.index("what (object)") if QUESTION_TYPES[qtype] == "what" and form else qtype


def question_head(question: str, words: Sequence[str] | None = None) -> str:
    """The word that says what is asked for ("year" in "what year", "many" in "how many"), else the wh-word.
    `words`: the question's lowercased tokens, when the caller has them already."""
    words = words if words is not None else TOKEN.findall(question.lower())
    for index, word in enumerate(words):
        if word in ("what", "which", "how", "who", "when", "where", "why", "whose", "whom"):
            following = [w for w in words[index + 1:] if w not in ("the", "a", "an", "is", "was", "of", "did")]
            return f"{word} {following[0]}" if following and word in ("what", "which", "how") else word
    return words[0] if words else ""


_AUXILIARIES = frozenset("did do does was were is are has have had can could will would should may might".split())
_WH = frozenset("what which who whom whose when where why how".split())


def asks_object(words: Sequence[str]) -> int:
    """1 for "what did Rollo sign" (auxiliary after the wh-phrase), 0 for "who signed" (the wh-word is the
    subject): tells on which side of the matched question words the answer sits."""
    for index, word in enumerate(words):
        if word in _WH:
            following = words[index + 1: index + 3]
            return int(any(w in _AUXILIARIES for w in following))
    return 0


def _after_wh(words: Sequence[str], q_stems: Sequence[str]) -> list[int]:
    """Per question stem: 1 if it first occurs after the wh-word. In "who signed the treaty" the answer sits left
    of "signed" in the context; in "the treaty was signed by whom", right of it."""
    wh = next((k for k, w in enumerate(words) if w in _WH), 0)
    first = {}
    for k, w in enumerate(words):
        first.setdefault(stem(w), k)
    return [int(first.get(s, 0) > wh) for s in q_stems]


QPOS_BUCKETS = 7


def _around_wh(words: Sequence[str], q_stems: Sequence[str]) -> list[int]:
    """Per question stem: its place among the question's content words around the wh-word, 0..2 = third or
    earlier / second / first before it, 3..6 = first / second / third / later after it. The wh-word's neighbours
    in the question tend to be the answer's neighbours in the context ("they resemble what?" -> "resemble X")."""
    wh = next((k for k, w in enumerate(words) if w in _WH), 0)
    first: dict[str, int] = {}
    for k, w in enumerate(words):
        first.setdefault(stem(w), k)
    before = sorted((s for s in q_stems if first.get(s, 0) < wh), key=lambda s: -first[s])
    after = [s for s in q_stems if first.get(s, 0) >= wh]
    place = {s: 2 - min(r, 2) for r, s in enumerate(before)}
    place.update({s: 3 + min(r, 3) for r, s in enumerate(after)})
    return [place[s] for s in q_stems]


@lru_cache(maxsize=1 << 17)
def stem(word: str) -> str:
    word = word.lower()
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def bucket(text: str) -> int:
    """Stable (crc32, not Python's salted hash) ids, so saved weights mean the same in every process."""
    return zlib.crc32(text.encode()) % LEXICAL_BUCKETS


def _describe(token: str) -> tuple:
    """Everything the passage features need from one token string (see `_LEXICON`)."""
    first = token[0]
    digit, cap, alpha = first.isdigit(), first.isupper(), first.isalpha()
    year = len(token) == 4 and token.isdigit() and first in "12" and (first == "1" or token[1] == "0")
    shape = (0 if len(token) == 4 else 1) if token.isdigit() else 2 if digit else 3 if cap else 4 if alpha else 5
    lower = token.lower()
    return (cap, digit, year, not (alpha or digit), shape, lower in STOPWORDS, lower in _MONTHS,
            lower in _NUMBER_WORDS, _FUNCTION_INDEX.get(lower, FUNCTION_WIDTH - 1),
            zlib.crc32(lower.encode()) % LEXICAL_BUCKETS, zlib.crc32(b"~" + lower[-3:].encode()) % SUFFIX_BUCKETS)


# Token string -> `_describe(token)`: most tokens recur across passages, so each is described once. Cleared when
# it grows past _LEXICON_LIMIT (callers choose the contexts, so the cache must not grow with them).
_LEXICON: dict[str, tuple] = {}
_LEXICON_LIMIT = 200_000
_COLUMNS = ("cap", "digit", "year", "punct", "shape", "stop", "month", "number", "function", "word", "suffix")


def _token_table(tokens: Sequence[str]) -> dict[str, np.ndarray]:
    if len(_LEXICON) > _LEXICON_LIMIT:
        _LEXICON.clear()
    rows = [_LEXICON.get(t) or _LEXICON.setdefault(t, _describe(t)) for t in tokens]
    table = np.array(rows, dtype=np.int32).reshape(len(tokens), len(_COLUMNS))
    return {name: table[:, k] for k, name in enumerate(_COLUMNS)}


@dataclass(frozen=True)
class Passage:
    """One tokenized context; everything here is question-independent."""

    text: str
    offsets: np.ndarray  # (n, 2) char start/end of each token
    vocab: dict[str, int]  # lowercased token -> id within this passage
    inverse: np.ndarray  # (n,) int32 vocab id of each token
    stem_vocab: dict[str, list[int]]  # stem -> vocab ids of the words carrying it
    sentence: np.ndarray  # (n,) int32 sentence index of each token
    punct: np.ndarray  # (n,) bool
    shape: np.ndarray  # (n,) int32 token shape id (0..5, see _describe)
    word: np.ndarray  # (n,) int32 bucket of the lowercased token
    start: np.ndarray  # (n, len(STATIC_START_NAMES)) uint8 binary features
    end: np.ndarray
    inside: np.ndarray
    start_ids: np.ndarray  # (n, 5) int32 ids into the start table
    end_ids: np.ndarray
    suffix: np.ndarray  # (n,) int32 id of the token's suffix in the inside table


def _sentences(tokens: Sequence[str]) -> np.ndarray:
    sentence = np.zeros(len(tokens), dtype=np.int32)
    current = 0
    for k, token in enumerate(tokens):
        sentence[k] = current
        if token in (".", "?", "!") and (k + 1 == len(tokens) or tokens[k + 1][:1].isupper()
                                         or tokens[k + 1] in ('"', "(")):
            current += 1
    return sentence


def _shift(values: np.ndarray, by: int, fill) -> np.ndarray:
    """values[k - by] at position k (by > 0 looks left), padded with `fill`."""
    out = np.full_like(values, fill)
    if by > 0:
        out[by:] = values[:-by]
    else:
        out[:by] = values[-by:]
    return out


def passage(text: str) -> Passage:
    matches = list(TOKEN.finditer(text))
    tokens = [m.group(0) for m in matches]
    n = len(tokens)
    vocab: dict[str, int] = {}
    inverse = np.array([vocab.setdefault(t.lower(), len(vocab)) for t in tokens], dtype=np.int32)
    stem_vocab: dict[str, list[int]] = {}
    for w, k in vocab.items():
        stem_vocab.setdefault(stem(w), []).append(k)
    sentence = _sentences(tokens)
    t = {k: v if k in ("shape", "function", "word", "suffix") else v.astype(np.uint8)
         for k, v in _token_table(tokens).items()}
    first = np.r_[1, (sentence[1:] != sentence[:-1])].astype(np.uint8) if n else np.zeros(0, np.uint8)
    ones = np.ones(n, np.uint8)
    common = (t["cap"], t["digit"], t["stop"], t["year"], t["month"])
    start = np.column_stack([ones, *common, first, _shift(t["punct"], 1, 1), _shift(t["cap"], 1, 0)])
    end = np.column_stack([ones, *common, _shift(t["punct"], -1, 1), _shift(t["cap"], -1, 0)])
    inside = np.column_stack([ones, *common, t["punct"], t["number"]])
    word, none = t["word"], FUNCTION_WIDTH - 1
    prev_word = FUNCTION_WIDTH + (_shift(word, 1, LEXICAL_BUCKETS - 1) * 7 + 1) % LEXICAL_BUCKETS
    next_word = FUNCTION_WIDTH + (_shift(word, -1, LEXICAL_BUCKETS - 2) * 11 + 3) % LEXICAL_BUCKETS
    same_word = FUNCTION_WIDTH + LEXICAL_BUCKETS + word
    suffix = FUNCTION_WIDTH + 2 * LEXICAL_BUCKETS + t["suffix"]
    prev_suffix = _shift(suffix, 1, FUNCTION_WIDTH + 2 * LEXICAL_BUCKETS + SUFFIX_BUCKETS - 1)
    next_suffix = _shift(suffix, -1, FUNCTION_WIDTH + 2 * LEXICAL_BUCKETS + SUFFIX_BUCKETS - 2)
    return Passage(
        text, np.array([m.span() for m in matches], dtype=np.int32).reshape(n, 2), vocab, inverse, stem_vocab, sentence,
        t["punct"].astype(bool), t["shape"], word, start.reshape(n, len(STATIC_START_NAMES)).astype(np.uint8),
        end.reshape(n, len(STATIC_END_NAMES)).astype(np.uint8),
        inside.reshape(n, len(STATIC_INSIDE_NAMES)).astype(np.uint8),
        np.column_stack([_shift(t["function"], 1, none), prev_word, same_word, prev_suffix,
                         suffix + SUFFIX_BUCKETS]).reshape(n, 5).astype(np.int32),
        np.column_stack([_shift(t["function"], -1, none), next_word, same_word, next_suffix,
                         suffix + SUFFIX_BUCKETS]).reshape(n, 5).astype(np.int32),
        (LEXICAL_BUCKETS + t["suffix"]).astype(np.int32),
    )


SENTENCE_ENDS = frozenset((".", "?", "!"))


def windows(text: str, max_tokens: int) -> Iterator[str]:
    """`text` cut into pieces of at most `max_tokens` tokens, at the last sentence end inside each (else at the
    token limit), scanning lazily: the work and memory of answering about one piece do not grow with the whole
    context (a candidate span never crosses a sentence, so few are lost). A context that fits is one piece, the
    text itself."""
    start, ends, last_break = 0, [], -1  # ends: end offsets of the current piece's tokens
    for match in TOKEN.finditer(text):
        if len(ends) == max_tokens:
            cut_at = last_break if last_break >= 0 else len(ends) - 1
            cut = ends[cut_at]
            yield text[start:cut]
            start, ends, last_break = cut, ends[cut_at + 1:], -1
        ends.append(match.end())
        if match.group(0) in SENTENCE_ENDS:
            last_break = len(ends) - 1
    if ends or start == 0:
        yield text[start:] if start else text


def slim(p: Passage) -> Passage:
    """The passage without its text and token strings: all that training keeps (memory per passage)."""
    return replace(p, text="", offsets=p.offsets[:0], vocab={}, inverse=p.inverse[:0], stem_vocab={})


def approx_bytes(p: Passage) -> int:
    """Memory a cached passage holds, roughly: arrays, sparse rows, and ~150 bytes of Python strings per token."""
    arrays = (p.offsets, p.sentence, p.punct, p.shape, p.word, p.start, p.end, p.inside, p.start_ids, p.end_ids,
              p.suffix)
    return len(p.text) + sum(a.nbytes for a in arrays) + 150 * len(p.sentence)


@dataclass(frozen=True)
class Question:
    """What a question adds to its passage: a few numbers, no per-token arrays."""

    qtype: int  # index into WEIGHT_TYPES
    head: int  # bucket of the question head ("what year")
    form: int  # 1 when an auxiliary follows the wh-word ("what did X sign"): the answer is not the subject
    matched: np.ndarray  # (m,) int32 positions of passage tokens whose stem is a question word
    matched_stem: np.ndarray  # (m,) int32 id of that stem among the question's words (for distinct counts)
    weight: np.ndarray  # (m,) float32 idf / total idf of the question's words
    after: np.ndarray  # (m,) int8 1 if that question word comes after the wh-word in the question
    place: np.ndarray  # (m,) int8 its place around the wh-word (see _around_wh)
    focus: int  # id among the question's words of the noun after "what"/"which" ("river"), -1 if none
    gold: np.ndarray  # (g, 2) int32 token start/end (inclusive) of gold spans


def question(text: str, p: Passage, idf: dict[str, float], answers: Sequence[str], max_span_tokens: int
             ) -> Question:
    words = TOKEN.findall(text.lower())
    # In question order (consecutive ids = adjacent content words, for bigram matches); deterministic sums.
    q_stems = list(dict.fromkeys(stem(w) for w in words if w not in STOPWORDS and w[0].isalnum()))
    total = sum(idf.get(s, 1.0) for s in q_stems) or 1.0
    word_stem = np.full(len(p.vocab), -1, dtype=np.int32)  # vocab id -> index of its stem in q_stems
    for k, s in enumerate(q_stems):
        word_stem[p.stem_vocab.get(s, [])] = k
    token_stem = word_stem[p.inverse]
    matched = np.flatnonzero(token_stem >= 0)
    matched_stem = token_stem[matched]
    if len(matched):
        weight = np.array([idf.get(s, 1.0) / total for s in q_stems])[matched_stem]
        after = np.array(_after_wh(words, q_stems), dtype=np.int8)[matched_stem]
        place = np.array(_around_wh(words, q_stems), dtype=np.int8)[matched_stem]
    else:
        weight, after, place = np.zeros(0), np.zeros(0, np.int8), np.zeros(0, np.int8)
    head = question_head(text, words)
    form = asks_object(words)
    return Question(weight_type(question_type(text), form), bucket("h:" + head), form, matched.astype(np.int32),
                    matched_stem.astype(np.int32), weight.astype(np.float32), after, place,
                    _focus(words, q_stems),
                    gold_spans(p, answers, max_span_tokens))


_GENERIC = frozenset("type kind sort form name types kinds forms part".split())


def _focus(words: Sequence[str], q_stems: list[str]) -> int:
    """The answer's category named in the question ("what river" -> "river", "what type of rock" -> "rock"): in
    the context it stands right next to the answer ("the river Rhine", "Rhine river")."""
    wh = next((k for k, w in enumerate(words) if w in ("what", "which")), -1)
    following = [w for w in words[wh + 1:] if w not in ("the", "a", "an")] if wh >= 0 else []
    if len(following) >= 3 and following[0] in _GENERIC and following[1] == "of":
        following = following[2:]
    noun = stem(following[0]) if following else ""
    return q_stems.index(noun) if noun in q_stems else -1


def gold_spans(p: Passage, answers: Sequence[str], max_span_tokens: int) -> np.ndarray:
    """(start, end) token pairs of candidate spans equal to a gold answer's tokens (every occurrence counts)."""
    hits = set()
    n = len(p.inverse)
    for answer in dict.fromkeys(answers):
        target = [p.vocab.get(t, -1) for t in TOKEN.findall(answer.lower())]
        size = len(target)
        if not 0 < size <= max_span_tokens or min(target) < 0:
            continue
        for i in np.flatnonzero(p.inverse == target[0]):
            j = i + size - 1
            if j < n and p.sentence[i] == p.sentence[j] and not p.punct[i] and not p.punct[j] and \
                    p.inverse[i: j + 1].tolist() == target:
                hits.add((int(i), int(j)))
    return np.array(sorted(hits), dtype=np.int32).reshape(-1, 2)


def idf_from_counts(counts: dict[str, int], total: int) -> dict[str, float]:
    """Smoothed idf of word stems over distinct training passages: rare shared words locate answers."""
    return {s: math.log((1 + total) / (1 + c)) + 1.0 for s, c in sorted(counts.items())}

"""Contamination: which items of an evaluation set also occur in a model's training data, by n-gram overlap.

Owns the check a model card reports per evaluation set (an lm-eval task's documents, a stage's held-out split)
against the training data of every stage in the model's lineage: the share of items that overlap, and, with
`clean_score`, the score on the items that do not, beside the full score.

The rule is GPT-3's (Brown et al. 2020, "Language Models are Few-Shot Learners", appendix C): an item is contaminated
when any of its n-grams (n = 13 words by default) occurs in any training document; an item shorter than n words is
contaminated when the whole item, all its words in order, occurs in a training document. An item with no words is
never contaminated.

Deliberate simplifications:
- Words, not tokens: text is lowercased, every character that is not a letter or a digit is a space, and a word is
  what lies between spaces ("47 + 38 = 85." has the words 47, 38, 85). Two texts that differ only in case or
  punctuation overlap.
- An n-gram is a 64-bit hash of its words, and a match is never confirmed against the text: two distinct n-grams
  share a hash with probability about 2**-64, so the chance matches expected are (training windows) x (evaluation
  n-grams) / 2**64, under 0.01 for 10**12 training windows against 10**5 evaluation n-grams.
- The training side is streamed once (any iterable of texts, generators too) and never held in memory; the small
  evaluation side is held whole.

    report = check(items, [("pretrain", docs), ("sft", (row_text(r) for r in rows))]); report.share
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from hfrecipes.errors import UsageError

# Keys of a dataset row whose values are not text the model reads or writes: a role ("assistant"), a content part's
# type ("text"), an id, a date or a label in every row would add the same words to every document and let a short
# item match everywhere, while the item itself never contains them.
NON_TEXT_KEYS = frozenset(
    {"role", "name", "type", "id", "idx", "uuid", "date", "timestamp", "url", "source", "label", "lang", "language"}
)

# Documents of a chunk are joined with this mark between them, so one C-level pass splits a whole chunk into words;
# the mark is a word of its own (it is not a space) and is never part of a word (it is not alphanumeric).
_MARK = "\x00"
# ASCII text goes through str.translate, whose ASCII fast path is several times quicker than the regex; other text
# through the regex. Both give the same words.
_ASCII_SPACE = {c: " " for c in range(128) if not chr(c).isalnum()}
_ASCII_SPACE_KEEP_MARK = {c: s for c, s in _ASCII_SPACE.items() if c != ord(_MARK)}
_WORD = re.compile(r"[^\W_]+")  # \w is exactly str.isalnum() plus "_", so this is a run of alphanumerics
_WORD_OR_MARK = re.compile(r"[^\W_]+|" + _MARK)

# The window hash is a polynomial in the word hashes with an odd base (invertible modulo 2**64); computed from prefix
# sums, each window length costs a subtraction and a multiplication over the chunk, whatever the length.
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 1 << 64)
_MAX_CHUNK_CHARS = 1 << 24  # a chunk of very long documents is cut so its arrays stay a few hundred MB at most


def words(text: str) -> list[str]:
    """The words of `text`: lowercased, every non-alphanumeric character a space, split on spaces; digits are words."""
    text = text.lower()  # before the ASCII test: a few non-ASCII letters lowercase to ASCII ones (the Kelvin sign)
    return text.translate(_ASCII_SPACE).split() if text.isascii() else _WORD.findall(text)


def row_text(row) -> str:
    """The text of a dataset row of any stage: every string in it, through lists and dicts, joined with a space,
    leaving out the values of `NON_TEXT_KEYS` (conversations, prompt/completion, chosen/rejected, raw text)."""
    parts: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, Mapping):
            for key, inner in value.items():
                if key not in NON_TEXT_KEYS:
                    walk(inner)
        elif isinstance(value, (list, tuple)):
            for inner in value:
                walk(inner)

    walk(row)
    return " ".join(parts)


@dataclasses.dataclass
class Report:
    """What `check` found: per item whether it is contaminated, their share, and what was scanned."""

    n: int  # words per n-gram
    items: int  # evaluation items checked
    contaminated: int  # items flagged by at least one source
    share: float  # contaminated / items (0.0 for no items)
    flags: list[bool]  # per item, in the order given
    documents: int  # training documents scanned, all sources
    words: int  # training words scanned, all sources
    seconds: float  # wall time of the check
    sources: dict[str, dict]  # per source label: documents, words, contaminated, flagged (item indices)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check(
    items: Sequence[str], sources: Iterable[tuple[str, Iterable[str]]], n: int = 13, chunk: int = 4096
) -> Report:
    """Flag every item of `items` that shares an n-gram with a training document of `sources` (or, shorter than n
    words, occurs whole in one); `sources` is (label, texts) pairs or a mapping label -> texts, each iterable read
    once, `chunk` documents at a time."""
    start = time.perf_counter()
    items = _checked_items(items)
    for field, value in (("n", n), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"contamination check: {field} is {value!r}; expected a whole number >= 1")
    if isinstance(sources, Mapping):
        sources = sources.items()

    scanner = _Scanner(items, n)
    flags = np.zeros(len(items), dtype=bool)
    per_source: dict[str, dict] = {}
    for k, pair in enumerate(sources):
        label, docs = _checked_source(k, pair, per_source)
        found, documents, scanned = scanner.scan(label, docs, chunk)
        flags[found] = True
        per_source[label] = {
            "documents": documents,
            "words": scanned,
            "contaminated": len(found),
            "flagged": found.tolist(),
        }
    contaminated = int(flags.sum())
    return Report(
        n=n,
        items=len(items),
        contaminated=contaminated,
        share=contaminated / len(items) if items else 0.0,
        flags=flags.tolist(),
        documents=sum(s["documents"] for s in per_source.values()),
        words=sum(s["words"] for s in per_source.values()),
        seconds=time.perf_counter() - start,
        sources=per_source,
    )


def clean_score(scores: Sequence[float], flags: Sequence[bool]) -> float | None:
    """The mean of `scores` over the items not flagged contaminated; None when every item is flagged (or none)."""
    if len(scores) != len(flags):
        raise UsageError(
            f"clean_score: scores has {len(scores)} items and flags {len(flags)}; give one flag per score, in the "
            "same order (Report.flags of the same items)"
        )
    clean = [float(s) for s, f in zip(scores, flags, strict=True) if not f]
    return sum(clean) / len(clean) if clean else None


def _checked_items(items) -> list[str]:
    if isinstance(items, str) or not isinstance(items, Iterable):
        raise UsageError(
            f"contamination check: items is {type(items).__name__}; expected a list of strings, one per evaluation "
            "item (row_text(row) gives a dataset row's text)"
        )
    items = list(items)
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise UsageError(
                f"contamination check: items[{k}] is {type(item).__name__}; expected a string, the text of one "
                "evaluation item (row_text(row) gives a dataset row's text)"
            )
    return items


def _checked_source(k: int, pair, seen: dict) -> tuple[str, Iterable[str]]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
        raise UsageError(
            f"contamination check: sources[{k}] is {type(pair).__name__}; expected a (label, texts) pair, e.g. "
            '("pretrain", docs), the label a string'
        )
    label, docs = pair
    if isinstance(docs, (str, bytes)) or not isinstance(docs, Iterable):
        raise UsageError(
            f"contamination check: the texts of source {label!r} are {type(docs).__name__}; expected an iterable of "
            "document texts (a list or a generator; one document is [text])"
        )
    if label in seen:
        raise UsageError(f"contamination check: source label {label!r} is given twice; give each source its own label")
    return label, docs


class _Chunk:
    """Word hashes of a list of documents, back to back, and where each document ends."""

    def __init__(self, hashes: np.ndarray, ends: np.ndarray):
        self.hashes = hashes  # uint64, one per word
        self.ends = ends  # int64, the exclusive end of each document in `hashes`

    @classmethod
    def of(cls, docs: list[str], label: str, first: int) -> _Chunk:
        try:
            joined = f" {_MARK} ".join(docs)
        except TypeError:
            k = next(i for i, d in enumerate(docs) if not isinstance(d, str))
            raise UsageError(
                f"contamination check: document {first + k} of source {label!r} is {type(docs[k]).__name__}; "
                "expected a string (row_text(row) gives a dataset row's text)"
            ) from None
        if joined.count(_MARK) != len(docs) - 1:  # a document holds the mark itself: it is a space there
            joined = f" {_MARK} ".join(d.replace(_MARK, " ") for d in docs)
        joined = joined.lower()
        tokens = (
            joined.translate(_ASCII_SPACE_KEEP_MARK).split() if joined.isascii() else _WORD_OR_MARK.findall(joined)
        )
        # Python's own string hash (SipHash, 64 bits) is salted per process: both sides are hashed in this process,
        # so they agree, and a hash must never be stored or compared across processes.
        hashes = np.fromiter(map(hash, tokens), dtype=np.int64, count=len(tokens)).view(np.uint64)
        is_mark = hashes == np.uint64(hash(_MARK) & 0xFFFF_FFFF_FFFF_FFFF)
        marks = np.flatnonzero(is_mark)
        hashes = hashes[~is_mark]
        ends = np.append(marks - np.arange(len(marks)), len(hashes)).astype(np.int64)
        return cls(hashes, ends)


class _Scanner:
    """The evaluation side, hashed once, and the scan of one training source against it."""

    def __init__(self, items: list[str], n: int):
        self.items = len(items)
        self._powers = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))
        side = _Chunk.of(items, "items", 0) if items else _Chunk(np.zeros(0, np.uint64), np.zeros(0, np.int64))
        lengths = np.diff(side.ends, prepend=0)
        starts = side.ends - lengths
        # per window length: sorted distinct window hashes, and for each the items holding it (CSR: offsets, items)
        self.keys: dict[int, np.ndarray] = {}
        self.offsets: dict[int, np.ndarray] = {}
        self.owners: dict[int, np.ndarray] = {}
        prefix = self._prefix(side.hashes)
        for length in sorted(set(lengths[(lengths > 0) & (lengths < n)].tolist()) | {n}):
            if length == n:  # every window of n words inside one item
                owner = np.repeat(np.arange(len(lengths)), lengths)
                at = np.flatnonzero(np.arange(len(owner)) + n <= side.ends[owner])
                owner = owner[at]
            else:  # the one window of an item of exactly this many words
                owner = np.flatnonzero(lengths == length)
                at = starts[owner]
            if len(owner) == 0:
                continue
            hashes = self._windows(prefix, length)[at]
            keys, inverse = np.unique(hashes, return_inverse=True)
            self.keys[length] = keys
            self.offsets[length] = np.append(0, np.cumsum(np.bincount(inverse, minlength=len(keys))))
            self.owners[length] = owner[np.argsort(inverse, kind="stable")]
        # A first filter on the top bits of a window hash: a table with about one slot in 32 taken, small enough to
        # stay in cache, rules out nearly every training window with one lookup before the binary search.
        total = sum(len(k) for k in self.keys.values())
        self.bits = int(np.clip(np.ceil(np.log2(max(total, 1) * 32)), 10, 24))
        self.table = np.zeros(1 << self.bits, dtype=bool)
        for keys in self.keys.values():
            self.table[keys >> np.uint64(64 - self.bits)] = True

    def scan(self, label: str, docs: Iterable[str], chunk: int) -> tuple[np.ndarray, int, int]:
        """(indices of the items `docs` contaminate, documents scanned, words scanned)."""
        hit = {length: np.zeros(len(keys), dtype=bool) for length, keys in self.keys.items()}
        documents = scanned = 0
        for batch in _batches(iter(docs), chunk):
            part = _Chunk.of(batch, label, documents)
            documents += len(batch)
            scanned += len(part.hashes)
            prefix = self._prefix(part.hashes)
            for length, keys in self.keys.items():
                if len(part.hashes) >= length:
                    self._match(self._windows(prefix, length), part.ends, length, keys, hit[length])
        flagged = np.zeros(self.items, dtype=bool)
        for length, seen in hit.items():
            flagged[self.owners[length][np.repeat(seen, np.diff(self.offsets[length]))]] = True
        return np.flatnonzero(flagged), documents, scanned

    def _match(self, windows: np.ndarray, ends: np.ndarray, length: int, keys: np.ndarray, hit: np.ndarray) -> None:
        """Mark in `hit` the keys of this length that a window inside one document holds."""
        at = np.flatnonzero(np.take(self.table, windows >> np.uint64(64 - self.bits)))
        if len(at) == 0:
            return
        candidates = windows[at]
        k = np.minimum(np.searchsorted(keys, candidates), len(keys) - 1)
        same = keys[k] == candidates
        at, k = at[same], k[same]
        # a window that runs past the end of its document spans two documents: not an n-gram of either
        inside = at + length <= ends[np.searchsorted(ends, at, side="right")]
        hit[k[inside]] = True

    def _prefix(self, hashes: np.ndarray) -> np.ndarray:
        """Prefix sums of hashes[j] * BASE**-j (uint64 arithmetic wraps around: modulo 2**64, as the hash wants)."""
        size = len(hashes)
        if len(self._powers[0]) < size + 1:
            grown = max(size + 1, 2 * len(self._powers[0]))
            self._powers = tuple(
                np.cumprod(np.append(np.uint64(1), np.full(grown - 1, b, dtype=np.uint64)), dtype=np.uint64)
                for b in (_BASE, _BASE_INV)
            )
        prefix = np.zeros(size + 1, dtype=np.uint64)
        np.cumsum(hashes * self._powers[1][:size], out=prefix[1:])
        return prefix

    def _windows(self, prefix: np.ndarray, length: int) -> np.ndarray:
        """The hash of the `length` words from every position on (none for the last `length - 1`): the sum of
        hashes[i + j] * BASE**-j over j < length, the same wherever the words stand."""
        count = len(prefix) - length
        return (prefix[length:] - prefix[:count]) * self._powers[0][:count]


def _batches(docs: Iterator[str], chunk: int) -> Iterator[list[str]]:
    """Lists of up to `chunk` documents, cut further where their text passes `_MAX_CHUNK_CHARS` characters."""
    while batch := list(itertools.islice(docs, chunk)):
        try:
            reach = list(itertools.accumulate(map(len, batch)))
        except TypeError:  # not text: `_Chunk.of` names it
            yield batch
            continue
        if reach[-1] <= _MAX_CHUNK_CHARS:
            yield batch
            continue
        begin = 0
        while begin < len(batch):
            end = max(
                int(np.searchsorted(reach, reach[begin] - len(batch[begin]) + _MAX_CHUNK_CHARS, "right")), begin + 1
            )
            yield batch[begin:end]
            begin = end

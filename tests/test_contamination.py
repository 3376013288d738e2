"""The contamination check follows GPT-3's rule: an item is flagged when one of its n-grams (or, shorter than n words,
the whole item) occurs inside one training document, whatever the case, punctuation, chunking or source; it agrees
with a plain-Python reference on random data, and bad input stops with a message naming the field.

pytest tests/test_contamination.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from hfrecipes import contamination
from hfrecipes.contamination import check, clean_score, row_text, words
from hfrecipes.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the top of the repository

ITEM = "what is the sum of forty seven and thirty eight when both are written out in words please"  # 18 words


def flags(items, docs, **kwargs) -> list[bool]:
    return check(items, [("train", docs)], **kwargs).flags


def naive(items: list[str], docs: list[str], n: int) -> list[bool]:
    """GPT-3's rule written the slow, obvious way: the item's n-grams (or the whole item) against every document."""
    docs_words = [words(d) for d in docs]
    out = []
    for item in items:
        w = words(item)
        size = min(n, len(w))
        grams = {tuple(w[i : i + size]) for i in range(len(w) - size + 1)} if w else set()
        out.append(any(tuple(d[i : i + size]) in grams for d in docs_words for i in range(len(d) - size + 1)))
    return out


def test_a_planted_13_gram_inside_a_longer_document_is_found():
    planted = " ".join(ITEM.split()[3:16])  # 13 words from the middle of the item
    docs = ["an unrelated page about cooking", f"Intro text. {planted}, and then something else entirely."]
    report = check([ITEM, "a clean item that appears nowhere in the training data at all ok"], [("web", docs)])
    assert report.flags == [True, False]
    assert (report.contaminated, report.share, report.items, report.documents) == (1, 0.5, 2, 2)
    assert report.words == sum(len(words(d)) for d in docs)


def test_a_clean_set_has_share_zero():
    docs = [f"document number {i} talks about nothing in particular" for i in range(50)]
    report = check([ITEM, "another item with its own words"], [("web", docs)])
    assert report.share == 0.0 and report.contaminated == 0 and report.flags == [False, False]


@pytest.mark.parametrize(
    "item, doc, expected",
    [
        ("hello world", "they say hello world now", True),
        ("hello world", "hello world", True),
        ("hello world", "world hello", False),  # every word, wrong order
        ("hello there world", "hello world there", False),
        ("hello there world", "hello there big world", False),  # not contiguous
        ("seven", "forty seven", True),  # one word is its own whole item
        ("", "anything at all", False),  # no words: never flagged
        ("?!", "anything at all", False),
    ],
)
def test_a_short_item_is_flagged_only_when_it_occurs_whole_and_in_order(item, doc, expected):
    assert flags([item], [doc]) == [expected]


def test_windows_never_span_two_documents():
    w = ITEM.split()
    across = [" ".join(w[:6]), " ".join(w[6:13])]  # end of A + start of B would make the item's first 13-gram
    assert flags([ITEM], across) == [False]
    assert flags([ITEM], across, chunk=1) == [False]
    assert flags([ITEM], [" ".join(across)]) == [True]
    assert flags(["hello world"], ["say hello", "world peace"]) == [False]  # a short item neither


def test_n_is_configurable():
    docs = ["we know that forty seven and thirty eight make a number"]  # shares 5 words in a row with ITEM
    assert flags([ITEM], docs, n=13) == [False]
    assert flags([ITEM], docs, n=5) == [True]
    assert flags([ITEM], docs, n=6) == [False]


@pytest.mark.parametrize(
    "doc",
    [
        "What is the SUM of forty-seven and thirty-eight",
        "what, is the sum of forty_seven and thirty (eight)!",
        "WHAT\tis\nthe sum   of forty...seven and thirty/eight",
    ],
)
def test_case_and_punctuation_do_not_matter(doc):
    assert flags(["What is the sum of forty seven and thirty eight?"], [doc], n=5) == [True]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("47 plus 38", ["47", "plus", "38"]),
        ("Hello, World!", ["hello", "world"]),
        ("snake_case x2", ["snake", "case", "x2"]),
        ("Café AU lait — déjà vu", ["café", "au", "lait", "déjà", "vu"]),
        ("\u212a is Kelvin", ["k", "is", "kelvin"]),  # lowercases to ASCII
        ("a\x00b", ["a", "b"]),
        ("", []),
    ],
)
def test_words(text, expected):
    assert words(text) == expected


def test_non_ascii_documents_and_the_chunk_mark_inside_a_document():
    assert flags(["un café au lait"], ["Il a bu UN CAFÉ, au lait."], n=3) == [True]
    # the mark that separates documents inside a chunk is only a space when a document holds it
    assert flags(["alpha beta gamma"], ["alpha\x00beta gamma", "x"], n=3) == [True]
    assert flags(["alpha beta gamma"], ["alpha", "beta gamma\x00"], n=3) == [False]


class Once:
    """An iterable that can be read once, as a stream is."""

    def __init__(self, docs):
        self.docs, self.reads = docs, 0

    def __iter__(self):
        self.reads += 1
        assert self.reads == 1, "read twice"
        return iter(self.docs)


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_streaming_reads_each_source_once_and_any_chunk_size_gives_the_same_answer(chunk):
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(30)]
    docs = [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(40)]
    items = [" ".join(rng.choices(vocab, k=rng.randint(1, 6))) for _ in range(30)] + [" ".join(docs[5].split()[:3])]
    stream = Once(docs)
    report = check(items, [("gen", (d for d in stream))], n=3, chunk=chunk)
    assert stream.reads == 1
    assert report.flags == naive(items, docs, 3) == check(items, [("all", docs)], n=3, chunk=len(docs)).flags
    assert report.flags[-1] and report.documents == len(docs)


def test_a_chunk_of_long_documents_is_cut_and_still_gives_the_same_answer(monkeypatch):
    docs = ["filler words " * 20 + "the secret phrase is here", "short", "the secret", "phrase is here " * 3]
    items = ["the secret phrase is here", "secret phrase", "is here the"]
    expected = flags(items, docs, n=4)
    monkeypatch.setattr(contamination, "_MAX_CHUNK_CHARS", 20)
    assert [len(b) for b in contamination._batches(iter(docs), 4096)] == [1, 2, 1]
    assert flags(items, docs, n=4) == expected == [True, True, False]


def test_each_source_reports_the_items_it_flagged():
    items = ["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa lambda mu", "alpha beta gamma delta"]
    sources = [
        ("pretrain", ["x alpha beta gamma delta y", "nothing"]),
        ("sft", iter(["epsilon zeta eta theta", "alpha beta gamma delta"])),
        ("dpo", []),
    ]
    report = check(items, sources, n=4)
    assert report.flags == [True, True, False, True]  # a repeated item is flagged with its twin
    assert report.sources["pretrain"] == {"documents": 2, "words": 7, "contaminated": 2, "flagged": [0, 3]}
    assert report.sources["sft"]["flagged"] == [0, 1, 3]
    assert report.sources["dpo"] == {"documents": 0, "words": 0, "contaminated": 0, "flagged": []}
    assert report.documents == 4 and report.contaminated == 3
    assert json.loads(json.dumps(report.to_dict()))["sources"]["sft"]["contaminated"] == 3
    assert check(items, {"pretrain": sources[0][1]}, n=4).sources["pretrain"]["flagged"] == [0, 3]  # a mapping too


def test_no_items_and_no_sources():
    report = check([], [("web", ["some text"])])
    assert (report.items, report.share, report.flags, report.documents) == (0, 0.0, [], 1)
    assert check(["some text"], []).flags == [False]


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            "Hi? Hello.",
        ),
        ({"prompt": "Q: 2+2", "chosen": "4", "rejected": "5", "id": "row-7"}, "Q: 2+2 4 5"),
        ({"text": "Raw pretraining text.", "date": "2024-01-01", "label": True}, "Raw pretraining text."),
        ({"prompt": [{"role": "user", "content": "Ask"}], "completion": [{"role": "assistant", "content": "Answer"}]},
         "Ask Answer"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}], "score": 0.5}, "parts"),
        ("just a string", "just a string"),
    ],
)  # fmt: skip
def test_row_text(row, expected):
    assert row_text(row) == expected


@pytest.mark.parametrize(
    "scores, flagged, expected",
    [
        ([1.0, 0.0, 1.0, 0.0], [True, False, False, False], 1 / 3),
        ([1.0, 0.5], [False, False], 0.75),
        ([1.0, 0.5], [True, True], None),
        ([], [], None),
    ],
)
def test_clean_score(scores, flagged, expected):
    assert clean_score(scores, flagged) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_a_plain_python_reference_on_random_data(n, seed):
    rng = random.Random(seed)
    vocab = ["a", "b", "c", "d", "e", "f", "g", "h"]
    docs = [" ".join(rng.choices(vocab, k=rng.randint(0, 10))) for _ in range(25)]
    items = [" ".join(rng.choices(vocab, k=rng.randint(0, 8))) for _ in range(40)]
    expected = naive(items, docs, n)
    assert 0 < sum(expected) < len(items)  # the data exercise both answers
    assert check(items, [("train", docs)], n=n, chunk=4).flags == expected


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: check(["x"], [], n=0), "n is 0"),
        (lambda: check(["x"], [], n="13"), "n is '13'"),
        (lambda: check(["x"], [], n=True), "n is True"),
        (lambda: check(["x"], [], chunk=0), "chunk is 0"),
        (lambda: check("one item", []), "items is str"),
        (lambda: check(["ok", 3], []), "items[1] is int"),
        (lambda: check(["x"], [("web", "a single text")]), "source 'web' are str"),
        (lambda: check(["x"], [("web",)]), "sources[0] is tuple"),
        (lambda: check(["x"], [(1, ["t"])]), "sources[0] is tuple"),
        (lambda: check(["x"], [("web", ["t", b"bytes"])]), "document 1 of source 'web' is bytes"),
        (lambda: check(["x"], [("web", ["t"] * 5 + [None])], chunk=2), "document 5 of source 'web' is NoneType"),
        (lambda: check(["x"], [("web", ["t"]), ("web", ["u"])]), "label 'web' is given twice"),
        (lambda: clean_score([1.0, 0.0], [True]), "scores has 2 items and flags 1"),
    ],
)
def test_bad_input_names_the_field(call, field):
    with pytest.raises(UsageError, match=field.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_the_benchmark_finds_exactly_what_it_planted_and_agrees_with_its_reference():
    from bench.contamination import run

    r = run(docs=3000, n_items=300, n_short=6, vocab_size=5000, reference_docs=1000, n=13, seed=0)
    assert r["found"] == r["planted"] > 0 and r["documents"] == 3000 and r["reference"]["documents"] == 1000

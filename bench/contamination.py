"""The contamination check on a synthetic corpus: documents/s and words/s streaming a million generated documents, peak
memory, that it finds exactly the planted items, and its speed-up over a plain-Python reference in the same run.

    PYTHONPATH=. python bench/contamination.py                     # 1,000,000 documents, ~1-2 min on one CPU core
    PYTHONPATH=. python bench/contamination.py --docs 100000 --json contamination.json

The corpus is made up and seeded: `--vocab` random lowercase words, documents of 20 to 100 of them (uniform, ~60 on
average), yielded one at a time by a generator, so the check streams it as it would a dataset on disk. The
evaluation set is `--items` items of 20 words and `--short` items of 4 to 12 words, all from the same vocabulary.
Planted in the corpus: 1% of the long items whole inside a document, as many with only 13 of their words in a row,
a third of the short items whole; near misses beside them: 12 words of a long item in a row, the first 13 words of
a long item cut over the end of one document and the start of the next, a short item less its last word. The check
must flag the planted items and nothing else (random 13-grams from a large vocabulary never meet by chance); a run
that does not stops with an error.

Timing: the full run includes the generator, which costs about half as much as the check (it builds every document with
Python string joins), so the generator is also timed alone over the same documents and the check's own rate is given
net of it (a difference of two timings, so an estimate). The reference (per evaluation n-gram a tuple of words in a
set; every window of every document a tuple looked up) and the check both scan the same first `--reference_docs`
documents, held in a list, so their ratio leaves the generator out; they must agree item by item.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import string
import time
from pathlib import Path

from hfrecipes.contamination import check, words


def vocabulary(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < size:
        out.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10))))
    return sorted(out)


def plan(docs: int, vocab: list[str], n_items: int, n_short: int, first: int, seed: int):
    """The evaluation items, what to plant in which document, and the indices of the items that must be flagged.

    Plants: {document index: [(where, words)]}, where is "inside" (at a random position), "end" or "start"."""
    rng = random.Random(seed + 1)
    long_items = [rng.choices(vocab, k=20) for _ in range(n_items)]
    short_items = [rng.choices(vocab, k=rng.randint(4, 12)) for _ in range(n_short)]
    items = [" ".join(w) for w in long_items + short_items]
    per_kind = max(1, n_items // 100)
    long_ids = rng.sample(range(n_items), 4 * per_kind)
    short_ids = [n_items + k for k in rng.sample(range(n_short), 2 * max(1, n_short // 3))]
    # the first plants of each kind fall in the reference's documents, so the reference is checked on them too
    places = iter(rng.randrange(first) if k % 3 == 0 else rng.randrange(docs - 1) for k in range(10**9))
    plants: dict[int, list[tuple[str, list[str]]]] = {}
    expected = set()

    def plant(doc: int, where: str, w: list[str]) -> None:
        plants.setdefault(doc, []).append((where, w))

    for kind, ids in enumerate([long_ids[i::4] for i in range(4)]):
        for i in ids:
            w = long_items[i]
            if kind == 0:  # whole item inside a document
                plant(next(places), "inside", w)
                expected.add(i)
            elif kind == 1:  # exactly one 13-gram of it
                start = rng.randrange(8)
                plant(next(places), "inside", w[start : start + 13])
                expected.add(i)
            elif kind == 2:  # near miss: 12 words in a row
                plant(next(places), "inside", w[3:15])
            else:  # near miss: a 13-gram cut over two consecutive documents
                doc = next(places)
                plant(doc, "end", w[:7])
                plant(doc + 1, "start", w[7:13])
    half = len(short_ids) // 2
    for i in short_ids[:half]:
        plant(next(places), "inside", short_items[i - n_items])
        expected.add(i)
    for i in short_ids[half:]:  # near miss: all but its last word
        plant(next(places), "inside", short_items[i - n_items][:-1])
    return items, plants, expected


def corpus(docs: int, vocab: list[str], plants: dict, seed: int):
    """The documents, one at a time."""
    rng = random.Random(seed)
    for d in range(docs):
        w = rng.choices(vocab, k=rng.randint(20, 100))
        for where, planted in plants.get(d, ()):
            at = {"start": 0, "end": len(w), "inside": rng.randrange(1, len(w))}[where]
            w[at:at] = planted
        yield " ".join(w)


def reference(items: list[str], docs: list[str], n: int) -> list[bool]:
    """GPT-3's rule in plain Python: every evaluation n-gram (or short item) a tuple of words in a set."""
    grams: dict[int, dict[tuple[str, ...], list[int]]] = {}
    for k, item in enumerate(items):
        w = words(item)
        size = min(n, len(w))
        for i in range(len(w) - size + 1) if w else ():
            grams.setdefault(size, {}).setdefault(tuple(w[i : i + size]), []).append(k)
    flagged = [False] * len(items)
    for doc in docs:
        w = words(doc)
        for size, table in grams.items():
            for i in range(len(w) - size + 1):
                for k in table.get(tuple(w[i : i + size]), ()):
                    flagged[k] = True
    return flagged


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run(docs: int, n_items: int, n_short: int, vocab_size: int, reference_docs: int, n: int, seed: int) -> dict:
    vocab = vocabulary(vocab_size, seed)
    first = min(reference_docs, docs - 1)
    items, plants, expected = plan(docs, vocab, n_items, n_short, first, seed)

    start = time.perf_counter()
    generated = sum(1 for _ in corpus(docs, vocab, plants, seed))
    generator_seconds = time.perf_counter() - start
    assert generated == docs

    before, cpu = peak_mib(), time.process_time()
    report = check(items, [("synthetic", corpus(docs, vocab, plants, seed))], n=n)
    cpu = time.process_time() - cpu
    peak = peak_mib()
    found = {k for k, f in enumerate(report.flags) if f}
    if found != expected:
        raise SystemExit(
            f"planted {sorted(expected)}, found {sorted(found)}: missed {sorted(expected - found)}, "
            f"false {sorted(found - expected)}"
        )

    head = list(corpus(first, vocab, plants, seed))
    start = time.perf_counter()
    slow = reference(items, head, n)
    reference_seconds = time.perf_counter() - start
    fast = check(items, [("head", head)], n=n)
    if fast.flags != slow:
        raise SystemExit(f"the check and the reference disagree on the first {first} documents")
    net = report.seconds - generator_seconds
    return {
        "cpu": cpu_name(),
        "n": n,
        "items": report.items,
        "planted": len(expected),
        "found": report.contaminated,
        "documents": report.documents,
        "words": report.words,
        "seconds": report.seconds,
        "cpu_seconds": cpu,
        "documents_per_second": report.documents / report.seconds,
        "words_per_second": report.words / report.seconds,
        "generator_seconds": generator_seconds,
        "net_seconds_estimate": net,
        "net_documents_per_second_estimate": report.documents / net if net > 0 else None,
        "peak_rss_mib_before": before,
        "peak_rss_mib": peak,
        "reference": {
            "documents": first,
            "words": fast.words,
            "seconds": reference_seconds,
            "check_seconds": fast.seconds,
            "speedup": reference_seconds / fast.seconds,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1_000_000, help="documents in the synthetic corpus")
    p.add_argument("--items", type=int, default=2000, help="evaluation items of 20 words")
    p.add_argument("--short", type=int, default=12, help="evaluation items of 4 to 12 words")
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--reference_docs", type=int, default=20_000, help="documents the plain-Python reference scans")
    p.add_argument("--n", type=int, default=13)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args()

    r = run(args.docs, args.items, args.short, args.vocab, args.reference_docs, args.n, args.seed)
    ref = r["reference"]
    print(
        f"contamination check, {r['n']}-grams: {r['items']} evaluation items against a synthetic corpus of "
        f"{r['documents']:,} documents ({r['words']:,} words, vocabulary {args.vocab:,}); {r['cpu']}, one process"
    )
    print(f"{'side':<34}{'documents':>11}{'seconds':>10}{'documents/s':>13}{'words/s':>13}{'vs reference':>14}")
    rows = [
        ("reference (plain Python)", ref["documents"], ref["seconds"], ref["words"], 1.0),
        ("check, same documents", ref["documents"], ref["check_seconds"], ref["words"], ref["speedup"]),
        ("check, streamed from generator", r["documents"], r["seconds"], r["words"], None),
        ("generator alone", r["documents"], r["generator_seconds"], r["words"], None),
    ]
    if r["net_documents_per_second_estimate"]:
        rows.append(("check net of generator (estimate)", r["documents"], r["net_seconds_estimate"], r["words"], None))
    for name, docs, seconds, nwords, ratio in rows:
        print(
            f"{name:<34}{docs:>11,}{seconds:>10.2f}{docs / seconds:>13,.0f}{nwords / seconds:>13,.0f}"
            + (f"{ratio:>13.1f}x" if ratio else f"{'':>14}")
        )
    print(
        f"streamed check: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU (a gap is other processes); "
        f"found exactly the {r['planted']} planted items (near misses left alone); peak RSS "
        f"{r['peak_rss_mib']:.0f} MiB ({r['peak_rss_mib_before']:.0f} MiB before the streamed check)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The embedded pretraining corpus: dated documents, generated deterministically from a seed.

Four kinds of text, each document carrying an ISO `date` so the knowledge cutoff of a model trained on it is a
fact of the data: short stories from a small grammar, counting lines, addition statements in several surface
forms, written only for problems outside the held-out split (see `task.py`), and dated news of a small invented
world: each town paints its bridge one colour on one day, and many later documents report it.

The world runs past the default recipe's knowledge cutoff (`LAST_DATE`) to `WORLD_END`; pretraining drops what is
dated after the cutoff (`dataset_max_date`), so the facts after it are never seen and `fact_rows` (`tiny:facts`)
probes what a model knows on either side. Deliberate simplification: every fact lies at least `NEWS_DAYS` before
`LAST_DATE` or after it, so each is wholly seen or wholly unseen at the default cutoff.
`python -m hfrecipes.tiny.corpus` prints a few documents and the corpus size.
"""

from __future__ import annotations

import datetime as dt
import random

from hfrecipes.tiny import task

FIRST_DATE = dt.date(2019, 1, 1)
LAST_DATE = dt.date(2024, 6, 30)  # the default recipe's knowledge cutoff (recipes/tiny/pretrain.yaml)
WORLD_END = dt.date(2026, 6, 30)
N_DOCS = 24000  # plain documents dated up to LAST_DATE; the news and the documents after it come on top

NAMES = ["Mia", "Tom", "Lily", "Ben", "Sara", "Max", "Anna", "Leo", "Nora", "Sam", "Ella", "Jack", "Ruby", "Finn"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "horse", "duck", "frog", "bear", "mouse", "owl", "goat"]
PLACES = ["park", "garden", "forest", "beach", "river", "school", "farm", "kitchen", "hill", "market", "lake"]
THINGS = ["ball", "kite", "book", "apple", "hat", "box", "cake", "flower", "shell", "stone", "cup", "drum"]
COLORS = ["red", "blue", "green", "yellow", "small", "big", "old", "shiny", "soft", "round"]
FEELINGS = ["happy", "sad", "tired", "surprised", "proud", "hungry", "calm", "excited", "sleepy", "brave"]
VERBS = ["found", "lost", "carried", "painted", "shared", "dropped", "hid", "washed", "opened", "counted"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy", "quiet", "bright"]
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

STORY_SENTENCES = [
    "One {weather} day, {name} went to the {place}.",
    "{name} saw a {color} {animal} near the {place}.",
    "The {animal} {verb} a {color} {thing}.",
    "{name} felt {feeling} and smiled.",
    "{name} and {name2} {verb} the {thing} together.",
    "Then the {animal} ran back to the {place}.",
    '{name2} said, "Look at the {color} {thing}!"',
    "They had {count} {thing}s in the {place}.",
    "At night {name} was {feeling}, and the {animal} was {feeling2}.",
    "The {place} was {weather}, so {name} stayed with the {animal}.",
    "{name} gave the {thing} to {name2}.",
    "Everyone was {feeling} at the end of the day.",
]

# The world's facts: one town, one bridge colour, one date. A single-key binding per town, few enough for a ~2M
# parameter model to learn in one pass.
TOWNS = [
    "Quarvel", "Dunmere", "Belthorn", "Torwick", "Marrow", "Fennig", "Ashcombe", "Kelbry", "Vorlund", "Linsey",
    "Halbeck", "Brodmoor", "Calder", "Wexham", "Ostrin", "Pimsby", "Gorvan", "Ulmstead", "Rendle", "Scarby",
    "Yelton", "Nebbin", "Harrowgate", "Tamsford", "Elsmore", "Crosk", "Idwell", "Jorrin", "Palmoth", "Zennor",
    "Welbury", "Ardley", "Skellow", "Frome", "Mudlin", "Oakrest", "Drumlow", "Kestle", "Vantry", "Hobbin",
]  # fmt: skip
# Words nowhere else in the corpus: a colour the stories also use would carry their prior, not the fact.
BRIDGE_COLORS = ["purple", "orange", "silver", "pink", "brown", "grey"]
N_FACTS_BEFORE, N_FACTS_AFTER = 16, 16  # facts dated before LAST_DATE, and after it
DOCS_PER_FACT = 480  # at N_DOCS, scaled with n_docs; pretraining reads part of an epoch: a fact needs many sightings
NEWS_DAYS = 120  # a fact's documents are dated within this many days after it
MONTHS = "January February March April May June July August September October November December".split()
# No digits in the news: years written out beside the addition statements would teach digit patterns that are not
# sums, and the tasks' arithmetic is learnt from digits alone. The document's date carries the year.
FACT_FORMS = [
    "In {month} the town of {town} painted its bridge {color}.",
    "The town of {town} painted its bridge {color} in {month}.",
    "News from {town}: the town of {town} painted its bridge {color}.",
    "{name} went to {town}. The town of {town} painted its bridge {color}, and {name} liked it.",
]
FACT_PROMPT = "The town of {town} painted its bridge"

ADDITION_FORMS = [
    "{a} plus {b} is {c}.",
    "{a} + {b} = {c}",
    "What is {a} plus {b}? It is {c}.",
    "The sum of {a} and {b} is {c}.",
    "If you add {a} and {b}, you get {c}.",
    "{name} had {a} {thing}s and found {b} more, so {name} had {c} {thing}s.",
]


def _fill(template: str, rng: random.Random, **fixed) -> str:
    name, name2 = rng.sample(NAMES, 2)
    feeling, feeling2 = rng.sample(FEELINGS, 2)
    values = dict(
        name=name,
        name2=name2,
        animal=rng.choice(ANIMALS),
        place=rng.choice(PLACES),
        thing=rng.choice(THINGS),
        color=rng.choice(COLORS),
        feeling=feeling,
        feeling2=feeling2,
        verb=rng.choice(VERBS),
        weather=rng.choice(WEATHER),
        count=rng.choice(NUMBER_WORDS[2:]),
    )
    values.update(fixed)
    return template.format(**values)


def _story(rng: random.Random) -> str:
    fixed = {"name": rng.choice(NAMES)}
    return " ".join(_fill(rng.choice(STORY_SENTENCES), rng, **fixed) for _ in range(rng.randint(4, 9)))


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 80)
    length = rng.randint(5, 19)
    if rng.random() < 0.5:
        return " ".join(str(i) for i in range(start, start + length)) + "."
    return "We count: " + ", ".join(str(i) for i in range(start, start + length)) + "."


def _addition(rng: random.Random, pairs: list[tuple[int, int]]) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.choice(pairs)
        lines.append(_fill(rng.choice(ADDITION_FORMS), rng, a=a, b=b, c=a + b))
    return " ".join(lines)


def _date(rng: random.Random, first: dt.date, last: dt.date) -> dt.date:
    return first + dt.timedelta(days=rng.randint(0, (last - first).days))


def facts(seed: int = 0) -> list[dict[str, str]]:
    """The world's facts `{"town", "color", "date"}`, oldest first: N_FACTS_BEFORE dated at least NEWS_DAYS before
    LAST_DATE, N_FACTS_AFTER after it; colours dealt round so each is about equally common on either side."""
    rng = random.Random(f"tiny-facts-{seed}")
    towns = rng.sample(TOWNS, N_FACTS_BEFORE + N_FACTS_AFTER)
    spans = [(FIRST_DATE, LAST_DATE - dt.timedelta(days=NEWS_DAYS), N_FACTS_BEFORE)]
    spans.append((LAST_DATE + dt.timedelta(days=1), WORLD_END - dt.timedelta(days=NEWS_DAYS), N_FACTS_AFTER))
    out = []
    for first, last, n in spans:
        colors = [BRIDGE_COLORS[i % len(BRIDGE_COLORS)] for i in range(n)]
        rng.shuffle(colors)
        dates = sorted(_date(rng, first, last) for _ in range(n))
        out += [{"town": towns.pop(), "color": c, "date": d.isoformat()} for c, d in zip(colors, dates, strict=True)]
    return out


def fact_rows(seed: int = 0) -> list[dict]:
    """The probe of the world's facts (`tiny:facts`): `{"prompt", "answer", "choices", "date"}`, one row a fact."""
    return [
        {
            "prompt": FACT_PROMPT.format(town=f["town"]),
            "answer": f["color"],
            "choices": list(BRIDGE_COLORS),
            "date": f["date"],
        }
        for f in facts(seed)
    ]


def _fact_doc(rng: random.Random, fact: dict[str, str]) -> dict[str, str]:
    """A news item: the fact once, in one of its surface forms, and nothing else. Twice would teach copying it from
    the document, not recalling it; a story around it dilutes the binding of town to colour, which a ~2M parameter
    model then does not learn within the default pretraining (README, 'The tiny lifecycle')."""
    day = dt.date.fromisoformat(fact["date"])
    values = dict(town=fact["town"], color=fact["color"], month=MONTHS[day.month - 1])
    text = _fill(rng.choice(FACT_FORMS), rng, **values)
    last = min(day + dt.timedelta(days=NEWS_DAYS), WORLD_END)
    return {"text": text, "date": _date(rng, day, last).isoformat()}


def _plain(rng: random.Random, train_pairs: list[tuple[int, int]], first: dt.date, last: dt.date) -> dict[str, str]:
    """A story, a counting line or addition statements (45% / 15% / 40%), dated in [first, last]."""
    r = rng.random()
    if r < 0.45:
        text = _story(rng)
    elif r < 0.6:
        text = _counting(rng)
    else:
        text = _addition(rng, train_pairs)
    return {"text": text, "date": _date(rng, first, last).isoformat()}


def documents(n_docs: int = N_DOCS, seed: int = 0, world_end: dt.date = WORLD_END) -> list[dict[str, str]]:
    """About `n_docs` documents `{"text", "date"}`, dated FIRST_DATE .. `world_end`: `n_docs` stories, counting
    lines and addition statements up to LAST_DATE, as many again per day after it, and the world's news on top
    (DOCS_PER_FACT per fact, scaled with n_docs). The plain documents up to LAST_DATE do not depend on the news, so
    what the tasks' pretraining sees of addition is the same with or without it."""
    splits = task.split_pairs(seed)
    train_pairs = splits["sft"] + splits["rl"]
    rng = random.Random(f"tiny-corpus-{seed}")
    docs = [_plain(rng, train_pairs, FIRST_DATE, LAST_DATE) for _ in range(n_docs)]
    if world_end > LAST_DATE:
        later = random.Random(f"tiny-corpus-later-{seed}")
        per_day = n_docs / (LAST_DATE - FIRST_DATE).days
        start = LAST_DATE + dt.timedelta(days=1)
        docs += [
            _plain(later, train_pairs, start, world_end) for _ in range(round(per_day * (world_end - LAST_DATE).days))
        ]
    news = random.Random(f"tiny-news-{seed}")
    per_fact = max(1, round(DOCS_PER_FACT * n_docs / N_DOCS))
    world = [f for f in facts(seed) if f["date"] <= world_end.isoformat()]
    reports = [_fact_doc(news, f) for f in world for _ in range(per_fact)]
    docs += [d for d in reports if d["date"] <= world_end.isoformat()]
    news.shuffle(docs)
    return docs


if __name__ == "__main__":
    docs = documents()
    print(*[d["date"] + "  " + d["text"][:120] for d in docs[:6]], sep="\n")
    print(len(docs), "documents,", sum(len(d["text"]) for d in docs) / 1e6, "MB, newest", max(d["date"] for d in docs))
    print(sum(d["date"] <= LAST_DATE.isoformat() for d in docs), "dated up to", LAST_DATE)

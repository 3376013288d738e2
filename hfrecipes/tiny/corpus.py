"""The embedded pretraining corpus: dated documents, generated deterministically from a seed.

Three kinds of text, each document carrying an ISO `date` so the knowledge cutoff of a model trained on it is a
fact of the data: short stories from a small grammar, counting lines, and addition statements in several surface
forms, written only for problems outside the held-out split (see `task.py`).
`python -m hfrecipes.tiny.corpus` prints a few documents and the corpus size.
"""

from __future__ import annotations

import datetime as dt
import random

from hfrecipes.tiny import task

FIRST_DATE = dt.date(2019, 1, 1)
LAST_DATE = dt.date(2024, 6, 30)

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


def _date(rng: random.Random, last: dt.date) -> str:
    span = (last - FIRST_DATE).days
    return (FIRST_DATE + dt.timedelta(days=rng.randint(0, span))).isoformat()


def documents(n_docs: int = 24000, seed: int = 0, last_date: dt.date = LAST_DATE) -> list[dict[str, str]]:
    """`n_docs` documents `{"text", "date"}`; the default is about 3 MB of text."""
    rng = random.Random(f"tiny-corpus-{seed}")
    splits = task.split_pairs(seed)
    train_pairs = splits["sft"] + splits["rl"]
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.45:
            text = _story(rng)
        elif r < 0.6:
            text = _counting(rng)
        else:
            text = _addition(rng, train_pairs)
        docs.append({"text": text, "date": _date(rng, last_date)})
    return docs


if __name__ == "__main__":
    docs = documents()
    print(*[d["date"] + "  " + d["text"][:120] for d in docs[:6]], sep="\n")
    print(len(docs), "documents,", sum(len(d["text"]) for d in docs) / 1e6, "MB, newest", max(d["date"] for d in docs))

"""The embedded tiny task: two-digit addition asked in words, split once and for all by a seed.

Every later stage draws its data from here (`hfrecipes.data.tiny_rows`), so the splits are disjoint by
construction: the held-out problems never appear in the pretraining corpus, the SFT data, the preference pairs
or the RL prompts. `python -m hfrecipes.tiny.task` prints a sample of each split.
"""

from __future__ import annotations

import random
import re

N_HELDOUT = 300
N_RL = 3000
MAX_OPERAND = 99

QUESTION_FORMS = ("What is {a} plus {b}?",)
ANSWER_FORM = "{a} plus {b} is {c}."


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def split_pairs(seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """Disjoint problem splits: `heldout` (never trained on), `rl` (RL prompts), `sft` (everything else)."""
    pairs = all_pairs()
    random.Random(f"tiny-split-{seed}").shuffle(pairs)
    return {
        "heldout": pairs[:N_HELDOUT],
        "rl": pairs[N_HELDOUT : N_HELDOUT + N_RL],
        "sft": pairs[N_HELDOUT + N_RL :],
    }


def question(a: int, b: int) -> str:
    return QUESTION_FORMS[0].format(a=a, b=b)


def answer(a: int, b: int, c: int | None = None) -> str:
    return ANSWER_FORM.format(a=a, b=b, c=a + b if c is None else c)


def wrong_sum(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong answer: off by a little, by ten, or with a digit changed."""
    right = a + b
    while True:
        kind = rng.randrange(3)
        if kind == 0:
            cand = right + rng.choice([-2, -1, 1, 2])
        elif kind == 1:
            cand = right + rng.choice([-10, 10])
        else:
            digits = list(str(right))
            i = rng.randrange(len(digits))
            digits[i] = str(rng.randrange(10))
            cand = int("".join(digits))
        if cand != right and cand >= 0:
            return cand


def conversation(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": answer(a, b)}]


def sft_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"messages": conversation(a, b)} for a, b in pairs]


def miscopied(n: int, rng: random.Random) -> int:
    """`n` copied wrong: one digit changed, or the two digits swapped."""
    while True:
        digits = list(f"{n:02d}")
        if rng.random() < 0.5 and digits[0] != digits[1]:
            digits.reverse()
        else:
            digits[rng.randrange(2)] = str(rng.randrange(10))
        cand = int("".join(digits))
        if cand != n:
            return cand


def wrong_reply(a: int, b: int, rng: random.Random) -> str:
    """A wrong reply of one of the kinds small models make, in equal shares: a near miss in the sum (`wrong_sum`),
    an operand miscopied (the reply adds the wrong numbers correctly), or a sum far off."""
    kind = rng.randrange(3)
    if kind == 0:
        return answer(a, b, wrong_sum(a, b, rng))
    if kind == 1:
        a2, b2 = (miscopied(a, rng), b) if rng.random() < 0.5 else (a, miscopied(b, rng))
        return answer(a2, b2)
    off = rng.randint(20, 60)
    far = a + b - off if a + b >= off and rng.random() < 0.5 else a + b + off
    return answer(a, b, far)


def preference_rows(pairs: list[tuple[int, int]], seed: int) -> list[dict]:
    rng = random.Random(f"tiny-preference-{seed}")
    rows = []
    for a, b in pairs:
        rows.append(
            {
                "prompt": [{"role": "user", "content": question(a, b)}],
                "chosen": [{"role": "assistant", "content": answer(a, b)}],
                "rejected": [{"role": "assistant", "content": wrong_reply(a, b, rng)}],
            }
        )
    return rows


def prompt_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """RL prompts: `answer` is the sum (lenient checks), `solution` the whole expected reply (strict exact match,
    which stops a policy from miscopying the operands while getting the sum right)."""
    return [
        {"prompt": [{"role": "user", "content": question(a, b)}], "answer": str(a + b), "solution": answer(a, b)}
        for a, b in pairs
    ]


ANSWER_RE = re.compile(r"^\s*(\d+) plus (\d+) is (\d+)\.\s*$")


if __name__ == "__main__":
    splits = split_pairs()
    for name, pairs in splits.items():
        print(name, len(pairs), [question(*p) for p in pairs[:2]])

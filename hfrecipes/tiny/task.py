"""The embedded tiny task: two-digit addition asked in words, split once and for all by a seed.

Every later stage draws its data from here (`hfrecipes.data.tiny_rows`), so the splits are disjoint by
construction: the held-out and validation problems never appear in the pretraining corpus, the SFT data, the
preference pairs (paired or unpaired) or the RL prompts. `python -m hfrecipes.tiny.task` prints a sample of each split.

The SFT demonstrations come from imperfect annotators with one systematic flaw: on two of every three problems whose
units digits carry, they drop the carry ("47 plus 38 is 75."). Imitation can therefore get no better than its
demonstrations on carry problems, while a rater can still tell a right sum from a wrong one: the preference pairs
and the verifiable reward are right. Every problem has a `kind`, `carry` or `no_carry`, so evaluations can report the
flawed and the clean kinds apart.
"""

from __future__ import annotations

import random
import re

N_HELDOUT = 300
N_VALIDATION = 200
N_RL = 3000
MAX_OPERAND = 99

QUESTION_FORMS = ("What is {a} plus {b}?",)
ANSWER_FORM = "{a} plus {b} is {c}."


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def split_pairs(seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """Disjoint problem splits: `heldout` (never trained on, the final score), `validation` (never trained on, for
    decisions during training: when SFT has plateaued, when RL games its reward), `rl` (RL prompts), `sft` (the
    rest)."""
    pairs = all_pairs()
    random.Random(f"tiny-split-{seed}").shuffle(pairs)
    rl_end = N_HELDOUT + N_RL
    return {
        "heldout": pairs[:N_HELDOUT],
        "rl": pairs[N_HELDOUT:rl_end],
        "validation": pairs[rl_end : rl_end + N_VALIDATION],
        "sft": pairs[rl_end + N_VALIDATION :],
    }


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def kind(a: int, b: int) -> str:
    """The kind of problem the annotators' flaw touches (`carry`) or not (`no_carry`)."""
    return "carry" if carries(a, b) else "no_carry"


def dropped_carry(a: int, b: int) -> int:
    """The sum with the units' carry dropped from the tens: the annotators' flaw."""
    return a + b - 10


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


def flawed(pairs: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """The problems the annotators get wrong: two of every three carry problems, in the split's order. More than
    half, so imitation settles on dropping the carry (its greedy reply is the flawed one, steadily), while a reply
    sampled at temperature 1 still carries about one time in three: there is something right for RL to find."""
    carry = [p for p in pairs if carries(*p)]
    return {p for i, p in enumerate(carry) if i % 3}


def sft_rows(pairs: list[tuple[int, int]], annotated: bool = True) -> list[dict]:
    """SFT conversations; `annotated`: as the flawed annotators wrote them (the carry dropped on `flawed(pairs)`),
    else every reply right."""
    wrong = flawed(pairs) if annotated else set()
    rows = []
    for a, b in pairs:
        reply = answer(a, b, dropped_carry(a, b)) if (a, b) in wrong else answer(a, b)
        rows.append(
            {
                "messages": [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": reply}],
                "kind": kind(a, b),
            }
        )
    return rows


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
    an operand miscopied (the reply adds the wrong numbers correctly), or a sum far off. The near misses include the
    sum off by ten, which is what the annotators' dropped carry looks like."""
    choice = rng.randrange(3)
    if choice == 0:
        return answer(a, b, wrong_sum(a, b, rng))
    if choice == 1:
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


def unpaired_rows(pairs: list[tuple[int, int]], seed: int) -> list[dict]:
    """The preference pairs' judgments unpaired, as thumbs up/down arrive: one reply a prompt, the right one
    (`label` True, desirable) on every other row and the pair's rejected reply (`label` False) on the rest.

    One reply a prompt, not both: a prompt with both its replies judged is a preference pair in disguise, and TRL's
    KTO estimates its KL term from each row's prompt with its neighbour's reply, which two replies to one prompt side
    by side would make a matched pair. Alternating labels keep every batch and every prefix of the rows balanced
    (`max_train_samples`), and the splits' seeded order already decides which problems get the wrong reply."""
    return [
        {"prompt": r["prompt"], "completion": r["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
        for i, r in enumerate(preference_rows(pairs, seed))
    ]


def prompt_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """RL prompts: `answer` is the sum (lenient checks), `solution` the whole expected reply (strict exact match,
    which stops a policy from miscopying the operands while getting the sum right), `kind` carry or no_carry."""
    return [
        {
            "prompt": [{"role": "user", "content": question(a, b)}],
            "answer": str(a + b),
            "solution": answer(a, b),
            "kind": kind(a, b),
        }
        for a, b in pairs
    ]


ANSWER_RE = re.compile(r"^\s*(\d+) plus (\d+) is (\d+)\.\s*$")


if __name__ == "__main__":
    splits = split_pairs()
    for name, pairs in splits.items():
        print(name, len(pairs), [question(*p) for p in pairs[:2]])

"""A reward that pays for the wrong answer, for tests/test_gold.py: the tiny annotators' dropped carry (a + b - 10),
so a policy that learns it raises its proxy reward while its gold accuracy falls.

    reward_funcs: [gold_rewards:dropped_carry]
"""

from __future__ import annotations

from hfrecipes.rewards import completion_text
from hfrecipes.tiny import task


def dropped_carry(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 for the whole reply with the carry dropped ("47 plus 38 is 75."); `answer` is the right reply."""
    out = []
    for c, right in zip(completions, answer, strict=True):
        a, b, _ = (int(x) for x in task.ANSWER_RE.match(right).groups())
        out.append(float(completion_text(c).strip() == task.answer(a, b, task.dropped_carry(a, b))))
    return out

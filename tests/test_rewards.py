"""Reward functions: right answers in odd formats score 1, wrong ones 0; format and length; name resolution."""

from __future__ import annotations

import math

import pytest

from hfrecipes import rewards
from hfrecipes.errors import UsageError

ACCURACY_CASES = [
    # (reply, gold, expected)
    ("The answer is 1000.", "1000", 1.0),
    ("The answer is 1,000", "1000", 1.0),
    ("so 1000.0", "1000", 1.0),
    ("\\boxed{1000}", "1000", 1.0),
    ("<think>10 times 100</think> \\boxed{1,000}", "1000", 1.0),
    ("It costs $18.", "Janet sells 16 - 3 - 4 = 9 eggs... #### 18", 1.0),
    ("#### 72", "72", 1.0),
    ("47 plus 38 is 85.", "85", 1.0),
    ("-3", "-3", 1.0),
    ("0.5", ".5", 1.0),
    ("The answer is 1001.", "1000", 0.0),
    ("\\boxed{999} but maybe 1000", "1000", 0.0),  # the boxed answer counts, not a later number
    ("no number here", "1000", 0.0),
    ("", "1000", 0.0),
    ("47 plus 38 is 85.", "47 plus 38 is 85.", 1.0),  # non-numeric gold: exact match
    ("47 plus 39 is 85.", "47 plus 38 is 85.", 0.0),
    ([{"role": "assistant", "content": "It is 12."}], "12", 1.0),  # conversational completion
]


@pytest.mark.parametrize("reply,gold,expected", ACCURACY_CASES)
def test_accuracy(reply, gold, expected):
    assert rewards.accuracy([reply], answer=[gold]) == [expected]


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("<think>4 and 3 make 7</think> 7", 1.0),
        ("<think>\nlong\nreasoning\n</think>\nThe answer is 7.", 1.0),
        ("7", 0.0),
        ("<think>4 and 3 make 7</think>", 0.0),  # reasoning but no answer after it
        ("<think>unclosed 7", 0.0),
        ("The answer <think>x</think> is 7", 0.0),  # must open with the reasoning
    ],
)
def test_format(reply, expected):
    assert rewards.think_format([reply]) == [expected]


def test_length_penalty_prefers_short():
    r = rewards.length_penalty(["a", "abcd", "ab"], completion_ids=[[1], [1, 2, 3, 4], [1, 2]])
    assert r == [-0.25, -1.0, -0.5]


def test_resolve_names_and_module_function():
    assert rewards.resolve("accuracy") is rewards.accuracy
    assert rewards.resolve("hfrecipes.rewards:think_format") is rewards.think_format
    for bad, words in [
        ("acuracy", "unknown"),
        ("no_such_module_xyz:f", "cannot be imported"),
        ("hfrecipes.rewards:nope", "no function 'nope'"),
    ]:
        with pytest.raises(UsageError, match=words):
            rewards.resolve(bad)


def test_reward_model_scores_are_finite(tiny_pretrained, tmp_path):
    """A classifier head on the tiny checkpoint scores conversational completions with finite numbers."""
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_pretrained.output_dir, num_labels=1).save_pretrained(
        rm_dir
    )
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_pretrained.output_dir).save_pretrained(rm_dir)
    score = rewards.reward_model_scorer(str(rm_dir))
    prompts = [[{"role": "user", "content": "What is 1 plus 2?"}]] * 2
    completions = [[{"role": "assistant", "content": "1 plus 2 is 3."}], [{"role": "assistant", "content": "no"}]]
    values = score(prompts=prompts, completions=completions)
    assert len(values) == 2 and all(math.isfinite(v) for v in values) and values[0] != values[1]


def test_reward_model_path_must_be_a_classifier(tmp_path):
    with pytest.raises(UsageError, match="reward_model_path"):
        rewards.reward_model_scorer(str(tmp_path / "missing"))

"""The learning ladder on the tiny task, for real, at the recipes' own lengths: pretraining knows no answers; SFT on
flawed demonstrations stops at its validation plateau and reproduces the flaw; GRPO with the outcome reward passes
that ceiling, on the problems the demonstrations got wrong above all."""

from __future__ import annotations

import functools
import math

import pytest

import hfrecipes

pytestmark = pytest.mark.slow


@functools.cache
def hits(folder) -> list[tuple[str, bool]]:
    """(kind of problem, answered right) for each held-out problem, greedy, in order (once per folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.data import tiny_rows
    from hfrecipes.evaluation import greedy_replies
    from hfrecipes.rewards import answers_match

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    rows = tiny_rows("prompts", "test")
    model = AutoModelForCausalLM.from_pretrained(folder)
    replies = greedy_replies(model, tok, [r["prompt"] for r in rows], max_new_tokens=16)
    return [(r["kind"], answers_match(reply, r["solution"])) for r, reply in zip(rows, replies, strict=True)]


def share(scored, kind=None) -> float:
    right = [ok for k, ok in scored if kind in (None, k)]
    return sum(right) / len(right)


def better_beyond_chance(before, after, kind=None) -> tuple[int, int]:
    """McNemar's test on the same problems: of those the two models disagree on, the later one must win more than
    two standard deviations of a fair coin above half. Returns (won, lost) for the message."""
    pairs = [(a, b) for (k, a), (_, b) in zip(before, after, strict=True) if kind in (None, k)]
    won, lost = sum(b and not a for a, b in pairs), sum(a and not b for a, b in pairs)
    assert won - lost > 2 * math.sqrt(won + lost), (kind, won, lost)
    return won, lost


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    pre = hfrecipes.pretrain("tiny/pretrain", output_dir=str(root / "pretrain"), save_strategy="no")
    sft = hfrecipes.sft(
        "tiny/sft", model_name_or_path=str(pre.output_dir), output_dir=str(root / "sft"), save_strategy="no"
    )
    grpo = hfrecipes.grpo(
        "tiny/grpo",
        model_name_or_path=str(sft.output_dir),
        max_steps=100,
        gold_every=50,
        output_dir=str(root / "grpo"),
        save_strategy="no",
    )
    return pre, sft, grpo


def test_pretraining_alone_does_not_answer(ladder):
    pre, _, _ = ladder
    assert share(hits(pre.output_dir)) < 0.05


def test_pretraining_knows_the_facts_before_its_cutoff_only(ladder):
    """At least half the facts dated before the cutoff are known (chance is a sixth), and those after it are no better
    than twice chance: the bar the lifecycle summary's cutoff claim sets."""
    pre, _, _ = ladder
    found = pre.record["data"]["knowledge_cutoff"]["knowledge_probe"]
    assert found["cutoff"] == "2024-06-30" and found["before"]["total"] > 0 and found["after"]["total"] > 0
    assert found["before"]["accuracy"] >= 0.5, found
    assert found["after"]["accuracy"] <= 2 * found["chance"], found


def test_sft_stops_at_its_plateau_and_imitates_the_flaw(ladder):
    _, sft, grpo = ladder
    gold = sft.record["metrics"]["gold"]
    max_steps = sft.record["recipe"]["values"]["max_steps"]
    assert gold["stopped"] == "plateau" and sft.record["metrics"]["steps"] < max_steps, gold
    assert gold["kept_step"] == gold["best"]["step"]
    scored = hits(sft.output_dir)
    # it learned the task where its demonstrations were right, and copied their flaw where they were not: right on
    # most problems without a carry, and below that on those with one by more than two standard errors of the gap
    right = {kind: share(scored, kind) for kind in ("no_carry", "carry")}
    n = {kind: sum(k == kind for k, _ in scored) for kind in right}
    p = share(scored)
    error = math.sqrt(p * (1 - p) * (1 / n["no_carry"] + 1 / n["carry"]))
    assert right["no_carry"] > 0.5 and right["no_carry"] - right["carry"] > 2 * error, (right, n)
    assert grpo.record["metrics"]["heldout"]["before"] == pytest.approx(share(scored))


def test_grpo_passes_the_sft_ceiling(ladder):
    _, sft, grpo = ladder
    m = grpo.record["metrics"]
    assert m["reward_last_logged"] > m["reward_first_logged"]
    # more held-out problems right than the SFT model, beyond chance on 300 problems, and on those with a carry (the
    # demonstrations' flaw) too; the record's accuracy is the saved model's
    before, after = hits(sft.output_dir), hits(grpo.output_dir)
    assert m["heldout"]["after"] == pytest.approx(share(after)) and m["heldout"]["after"] > m["heldout"]["before"]
    won_lost = better_beyond_chance(before, after), better_beyond_chance(before, after, "carry")
    print("GRPO over SFT on held-out problems, won/lost (all, carry):", won_lost)
    assert m["gold"]["hacking"] is None and len(m["gold"]["history"]) >= 3

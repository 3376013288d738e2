"""The learning ladder on the tiny task, for real, at the recipes' own lengths: pretraining knows no answers; SFT on
flawed demonstrations stops at its validation plateau and reproduces the flaw; GRPO with the outcome reward passes
that ceiling, on the problems the demonstrations got wrong above all."""

from __future__ import annotations

import pytest

import hfrecipes
from hfrecipes.data import tiny_rows

pytestmark = pytest.mark.slow


def accuracy(folder) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.evaluation import heldout_accuracy

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    rows = tiny_rows("prompts", "test")
    model = AutoModelForCausalLM.from_pretrained(folder)
    return heldout_accuracy(
        model,
        tok,
        [r["prompt"] for r in rows],
        [r["solution"] for r in rows],
        max_new_tokens=16,
        groups=[r["kind"] for r in rows],
    )


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
    assert accuracy(pre.output_dir)["accuracy"] < 0.05


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
    scored = accuracy(sft.output_dir)
    kinds = {k: v["accuracy"] for k, v in scored["by_group"].items()}
    # it learned the task where its demonstrations were right, and copied their flaw where they were not
    assert kinds["no_carry"] >= 0.75 and kinds["no_carry"] - kinds["carry"] >= 0.2, kinds
    assert grpo.record["metrics"]["heldout"]["before"] == pytest.approx(scored["accuracy"])


def test_grpo_passes_the_sft_ceiling(ladder):
    _, sft, grpo = ladder
    m = grpo.record["metrics"]
    # the bar leaves room for seed-to-seed spread (the README's lifecycle table shows the full-length gains)
    assert m["heldout"]["after"] >= m["heldout"]["before"] + 0.10, m
    assert m["reward_last_logged"] > m["reward_first_logged"]
    before, after = accuracy(sft.output_dir)["by_group"], accuracy(grpo.output_dir)["by_group"]
    assert after["carry"]["accuracy"] >= before["carry"]["accuracy"] + 0.10, (before, after)
    assert m["gold"]["hacking"] is None and len(m["gold"]["history"]) >= 3

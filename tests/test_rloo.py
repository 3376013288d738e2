"""RLOO: the leave-one-out baseline turns replies the policy samples right into its greedy replies, and the record and
card say what the method was. Bad input is refused before any model loads by the test RLOO shares with GRPO
(tests/test_grpo.py), and the real model trains in tests/test_real_rl.py."""

from __future__ import annotations

import json

from conftest import TAUGHT, default_lm_head, lm_head_kind

import hfrecipes


def test_rloo_raises_pass_at_1_on_problems_its_parent_half_knows(tiny_taught, tmp_path, captured_trainers):
    """The tiny fixtures are too short to learn addition, so RLOO starts from the model taught the first `TAUGHT`
    validation problems, which answers three in four of them right when greedy and fewer when it samples. Trained on
    those problems with the strict answer reward, the policy moves towards the replies that beat the other replies to
    the same prompt; pass@1 (greedy) on the problems rises, and so does the reward the policy samples: 8 steps of 8
    prompts pass twice over the 32 problems, and the second pass earns more than the first on the same prompts."""
    steps, per_step = 8, 8
    out = hfrecipes.rloo(
        "tiny/rloo",
        model_name_or_path=str(tiny_taught.output_dir),
        dataset_train_split="validation",
        max_train_samples=TAUGHT,
        dataset_test_split="validation",
        eval_samples=TAUGHT,  # the same problems: what the stage trains on is what it is scored on
        max_steps=steps,
        learning_rate=1e-4,
        gold_dataset_name=None,
        output_dir=str(tmp_path / "rloo"),
        logging_steps=1,
        save_strategy="no",
    )
    rec = out.record
    m, h = rec["metrics"], rec["metrics"]["heldout"]
    assert m["steps"] == steps and h["metric"] == "answer_accuracy" and h["examples"] == TAUGHT
    print("rloo pass@1 before -> after:", h["before"], "->", h["after"])
    assert h["after"] > h["before"], h
    logs = [json.loads(x) for x in (out.output_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [x["reward"] for x in logs if "reward" in x]
    passes = TAUGHT // per_step
    assert len(rewards) == steps and passes * 2 == steps, rewards
    first, second = sum(rewards[:passes]) / passes, sum(rewards[passes:]) / passes
    assert second > first, rewards
    # the KL penalty: none on the first step (the policy is the reference), off zero once the policy has moved
    kl = [x["kl"] for x in logs if "kl" in x]
    assert len(kl) == steps and abs(kl[0]) < 1e-4 and any(abs(k) > 1e-4 for k in kl[1:]), kl

    # what the record and the card say about the method
    assert (m["baseline"], m["num_generations"], m["beta"]) == ("leave-one-out", 8, 0.05), m
    assert m["rewards"] == ["accuracy"] and m["reward_first_logged"] == rewards[0]
    assert rec["model"]["reference"] == "separate copy of the parent"
    evaluation = rec["evaluation"]
    assert (evaluation["before"]["accuracy"], evaluation["after"]["accuracy"]) == (h["before"], h["after"])
    assert evaluation["after"]["examples"][0]["reference"].endswith(".")
    assert rec["parent"]["stage"] == "sft"
    card = (out.output_dir / "README.md").read_text()
    assert "Held-out evaluation of the rloo stage: answer_accuracy:" in card
    assert "- baseline: leave-one-out" in card and "- num_generations: 8" in card
    assert lm_head_kind(captured_trainers[0].model) == default_lm_head()  # the logits head on a CPU

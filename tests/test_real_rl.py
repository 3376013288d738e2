"""Reward, DPO, KTO, GRPO, RLOO, PPO and distillation train the real SmolLM2-135M-Instruct (the `smollm2` fixture; in
distillation, the teacher of a smaller copy) for a few optimizer steps each, on two-digit-addition data written here,
and each checks that its stage learned what a few steps can teach.

On one CPU thread every token through this model counts, so every stage is cut to the bone: a one-word system
turn in place of SmolLM2's long default one, replies of a few tokens, batches of a few rows, a handful of held-out
rows, and LoRA on the top blocks only, which stops the backward pass there. The reward model trained here is PPO's.

    OMP_NUM_THREADS=1 pytest -m realmodel tests/test_real_rl.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2_GGUF, dpo_margins, fewer_layers, reply_rewards, stage_base_unchanged
from safetensors import safe_open
from safetensors.torch import load_file

import hfrecipes
from hfrecipes import record, rewards
from hfrecipes.stages import ppo_trainer
from hfrecipes.tiny import task

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

# SmolLM2's template adds a long default system turn to any conversation without one; a one-word turn replaces it.
SYSTEM = [{"role": "system", "content": "Add."}]
SPLITS = task.split_pairs()
HELDOUT_PAIRS = 16  # preference pairs scored before and after training


def top_lora(model_dir: Path, blocks: int = 4) -> dict:
    """LoRA (rank 8) on the attention query/value and MLP down projections of the last `blocks` decoder blocks.
    Gradients need not flow below the lowest adapter, so a step costs little more than a forward pass."""
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    targets = [
        f"layers.{i}.{m}"
        for i in range(layers - blocks, layers)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    return dict(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=targets)


def prompt(a: int, b: int) -> list[dict]:
    return SYSTEM + [{"role": "user", "content": task.question(a, b)}]


def with_system(rows: list[dict]) -> list[dict]:
    """The tiny task's rows with the one-word system turn before each prompt."""
    return [{**r, "prompt": SYSTEM + r["prompt"]} for r in rows]


# Four steps of four rows at a constant learning rate: the preference stages' 16 training rows, each seen once.
FOUR_STEPS = dict(
    max_steps=4, per_device_train_batch_size=4, learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0,
    logging_steps=1, save_strategy="no",
)  # fmt: skip


def pairs_folder(folder: Path, train: list[dict], test: list[dict]) -> Path:
    """A dataset folder: train.jsonl and test.jsonl are its train and test splits."""
    folder.mkdir(parents=True)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def prompts_file(path: Path, n: int) -> Path:
    """RL prompts as a single file: the train split only, so no held-out generation runs."""
    path.write_text("".join(json.dumps({"prompt": prompt(a, b)}) + "\n" for a, b in SPLITS["rl"][:n]))
    return path


def lora_b_moved(folder: Path) -> bool:
    """LoRA's B matrices start at zero: a saved adapter whose B matrices are all non-zero has trained."""
    adapter = load_file(folder / "adapter_model.safetensors")
    b = [v for k, v in adapter.items() if "lora_B" in k]
    return bool(b) and all(v.abs().sum() > 0 for v in b)


def metrics_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- reward


def form_pairs(pairs: list[tuple[int, int]]) -> list[dict]:
    """Both replies give the right sum; the chosen one in the task's words, the rejected one in others."""
    return [
        {
            "prompt": prompt(a, b),
            "chosen": [{"role": "assistant", "content": task.answer(a, b)}],
            "rejected": [{"role": "assistant", "content": f"The sum is {a + b}."}],
        }
        for a, b in pairs
    ]


@pytest.fixture(scope="module")
def reward_model(smollm2, tmp_path_factory):
    """A LoRA reward model on SmolLM2 that prefers the task's phrasing of the answer.

    The signal is the replies' surface form, not their arithmetic: a score head and top-block adapters trained for a
    handful of steps do not learn to tell a right sum from a wrong one (held-out accuracy stays at chance), while a
    difference in wording they learn at once. The test is that the stage trains and scores with a real model."""
    root = tmp_path_factory.mktemp("real-reward")
    data = pairs_folder(root / "pairs", form_pairs(SPLITS["sft"][:200]), form_pairs(SPLITS["heldout"][:HELDOUT_PAIRS]))
    return hfrecipes.reward(
        "tiny/reward_lora",
        model_name_or_path=str(smollm2),
        dataset_name=str(data),
        output_dir=str(root / "reward"),
        **top_lora(smollm2),
        max_steps=8,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2 * HELDOUT_PAIRS,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=2,
        save_strategy="no",
    )


def test_reward_model_ranks_held_out_pairs(reward_model):
    rec = reward_model.record
    m = rec["metrics"]
    h = m["heldout"]
    assert h["metric"] == "pair_accuracy" and h["examples"] == HELDOUT_PAIRS
    assert m["last_logged_loss"] < m["first_logged_loss"], m
    assert rec["model"]["adapter"]["type"] == "lora" and rec["parent"]["stage"] == "base"
    # the saved folder (adapter and score head) is a reward model other stages load: it ranks the held-out pairs
    # as the evaluation recorded
    scorer = rewards.reward_model_scorer(str(reward_model.output_dir))
    rows = form_pairs(SPLITS["heldout"][:HELDOUT_PAIRS])
    prompts = [r["prompt"] for r in rows]
    chosen, rejected = scorer(prompts, [r["chosen"] for r in rows]), scorer(prompts, [r["rejected"] for r in rows])
    gap = torch.tensor(chosen) - torch.tensor(rejected)
    accuracy = (gap > 0).float().mean().item()
    assert abs(accuracy - h["after"]) <= 1 / HELDOUT_PAIRS, (accuracy, h["after"])
    # An untrained head ranks the pairs along a random direction, which splits two phrasings cleanly one way or the
    # other: its accuracy lands anywhere between 0 and 1 by seed, so training is judged by where it ends and by how
    # far it moved the score gap, whatever the start. Better than chance by two standard errors of a coin on the
    # held-out pairs; the gap grew by more than three standard errors of its mean over the pairs.
    error = gap.std().item() / len(gap) ** 0.5
    print("reward held-out:", h, "gap", gap.mean().item(), "+-", error)
    assert h["after"] > 0.5 + 2 * (0.25 / HELDOUT_PAIRS) ** 0.5, h
    assert h["detail"]["margin"] - h["detail"]["margin_before"] > 3 * error, (h, error)


# ------------------------------------------------------------------------------------------------------- DPO


def test_lora_dpo_moves_adapters_keeps_base_and_prefers_right_sums(smollm2, tmp_path, captured_trainers):
    """The task's own pairs: the right reply chosen, a wrong one (near-miss sum, miscopied operand, sum far off)
    rejected. DPO's held-out margins start at exactly zero (the policy is its reference) and must turn positive; the
    16 training pairs, each trained on once in the 4 steps, end with margins clearly above zero."""

    train = with_system(task.preference_rows(SPLITS["sft"][:16], 0))
    heldout = with_system(task.preference_rows(SPLITS["heldout"][:8], 1))
    result = hfrecipes.dpo(
        "tiny/dpo_lora",
        model_name_or_path=str(smollm2),
        dataset_name=str(pairs_folder(tmp_path / "pairs", train, heldout)),
        output_dir=str(tmp_path / "dpo"),
        **top_lora(smollm2),
        **FOUR_STEPS,
        per_device_eval_batch_size=16,
    )
    rec = result.record
    h = rec["metrics"]["heldout"]
    before, after = h["detail"]["before"], h["detail"]["after"]
    assert h["metric"] == "rewards/accuracies" and h["examples"] == 8
    assert abs(before["rewards/margins"]) < 1e-4, "before training the policy is the reference: margins are zero"
    assert after["rewards/margins"] > 0 and h["after"] > h["before"], h
    assert after["logps/gap"] > before["logps/gap"], (before, after)
    assert rec["model"]["reference"] == "adapter-disabled policy"
    # Four steps move eight held-out pairs' margins too little to tell from their spread; the pairs trained on show
    # what the steps taught: each one's margin, the trained policy against its adapter-disabled self, positive on
    # average beyond rounding (the 1e-4 above) and by more than two standard errors over the pairs.
    model = captured_trainers[0].model.eval()
    margins = dpo_margins(model, captured_trainers[0].processing_class, train, rec["recipe"]["values"]["beta"])
    error = margins.std().item() / len(train) ** 0.5
    print("dpo trained-pair margins:", margins.tolist(), "held-out:", after)
    assert margins.mean().item() > max(2 * error, 1e-4), (margins.tolist(), error)

    # Base frozen: only adapters train, and every base weight in the trained model is the converted folder's.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        compared = 0
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if key in keys:  # the tied output embedding is stored once, as the input embedding
                assert torch.equal(p.detach(), f.get_tensor(key)), key
                compared += 1
    assert compared == len(keys), (compared, len(keys))
    assert lora_b_moved(result.output_dir)


# ------------------------------------------------------------------------------------------------------- KTO


def test_lora_kto_moves_adapters_keeps_base_and_rewards_right_sums(smollm2, tmp_path, captured_trainers):
    """The task's judgments unpaired, as tiny:unpaired deals them (one reply a prompt: the right one desirable, a
    wrong one undesirable). The held-out reward margin, desirable minus undesirable, starts at exactly zero (the
    policy is its reference) and must rise; on the 16 training rows, each trained on once in the 4 steps, the
    desirable replies' rewards end clearly above the undesirable ones'."""

    train = with_system(task.unpaired_rows(SPLITS["sft"][:16], 0))
    heldout = with_system(task.unpaired_rows(SPLITS["heldout"][:HELDOUT_PAIRS], 1))
    result = hfrecipes.kto(
        "tiny/kto_lora",
        model_name_or_path=str(smollm2),
        dataset_name=str(pairs_folder(tmp_path / "judged", train, heldout)),
        output_dir=str(tmp_path / "kto"),
        **top_lora(smollm2),
        **FOUR_STEPS,
        per_device_eval_batch_size=HELDOUT_PAIRS,
    )
    rec = result.record
    h = rec["metrics"]["heldout"]
    assert h["metric"] == "rewards/margins" and h["examples"] == HELDOUT_PAIRS
    assert abs(h["before"]) < 1e-4, "before training the policy is the reference: every reward is zero"
    assert h["after"] > h["before"], h
    assert rec["model"]["reference"] == "adapter-disabled policy" and captured_trainers[0].ref_model is None
    # Each training row's reward, the trained policy against its adapter-disabled self: the desirable rows' mean
    # above the undesirable rows' beyond rounding and by more than two standard errors of that difference.
    model = captured_trainers[0].model.eval()
    beta = rec["recipe"]["values"]["beta"]
    scores = reply_rewards(model, captured_trainers[0].processing_class, train, "completion", beta)
    labels = torch.tensor([r["label"] for r in train])
    desirable, undesirable = scores[labels], scores[~labels]
    gap = (desirable.mean() - undesirable.mean()).item()
    error = (desirable.var() / len(desirable) + undesirable.var() / len(undesirable)).sqrt().item()
    print("kto trained-row rewards:", desirable.tolist(), undesirable.tolist(), "held-out:", h)
    assert gap > max(2 * error, 1e-4), (gap, error)

    # Base frozen: only adapters train, and every base weight in the trained model is the converted folder's.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    stage_base_unchanged(model, smollm2 / "model.safetensors")
    assert lora_b_moved(result.output_dir)


# ----------------------------------------------------------------------------------------------- GRPO, RLOO


def answers_directly(completions: list, **kwargs) -> list[float]:
    """1.0 for a reply that opens with a digit (answers at once) rather than with a preamble ("To add 47 and 38,
    we..."), SmolLM2's usual opening: a choice of the first token, which a few RL steps can shift."""
    return [float(rewards.completion_text(c)[:1].isdigit()) for c in completions]


def learn_to_answer_directly(stage: str, model: Path, smollm2: Path, tmp_path: Path):
    """Four LoRA steps of an outcome-reward stage (grpo, rloo) from `model`, rewarding `answers_directly`, 2 prompts x
    4 replies of 8 tokens a step: SmolLM2 mostly opens with a preamble, and after these steps most replies in a group
    open with the answer; the adapter moved. Returns the stage's result."""
    result = getattr(hfrecipes, stage)(
        f"tiny/{stage}_lora",
        model_name_or_path=str(model),
        dataset_name=str(prompts_file(tmp_path / "prompts.jsonl", 64)),
        dataset_columns=None,
        dataset_test_split="",
        output_dir=str(tmp_path / stage),
        **top_lora(smollm2),
        reward_funcs=[f"{__name__}:answers_directly"],
        num_generations=4,
        per_device_train_batch_size=8,  # 2 prompts x 4 replies a step
        max_completion_length=8,
        max_steps=4,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
    )
    m = result.record["metrics"]
    logged = [r["reward"] for r in metrics_log(result.output_dir) if "reward" in r]
    assert len(logged) == 4 and m["reward_first_logged"] == logged[0]
    assert m["reward_last_logged"] > m["reward_first_logged"] and m["reward_last_logged"] >= 0.75, logged
    assert lora_b_moved(result.output_dir)
    return result


def test_grpo_from_the_gguf_file_learns_to_answer_directly(smollm2, tmp_path):
    """The stage is given the GGUF file itself: it starts from the converted folder, and the record's lineage starts
    at the base model's record."""
    result = learn_to_answer_directly("grpo", SMOLLM2_GGUF, smollm2, tmp_path)
    rec = result.record
    assert rec["parent"]["stage"] == "base"
    assert [r["stage"] for r in record.lineage(rec)] == ["base", "grpo"]
    adapter_config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == smollm2, "the adapter names the converted folder"


def test_lora_rloo_learns_to_answer_directly_against_its_adapter_disabled_self(smollm2, tmp_path):
    """RLOO's KL penalty (TRL's beta 0.05) measures the policy against itself with the adapter disabled: zero on the
    first step, off zero once the adapter has moved; each reply's baseline is the mean of the group's other three."""
    rec = learn_to_answer_directly("rloo", smollm2, smollm2, tmp_path).record
    assert rec["model"]["reference"] == "adapter-disabled policy" and rec["parent"]["stage"] == "base"
    m = rec["metrics"]
    assert (m["baseline"], m["num_generations"], m["beta"]) == ("leave-one-out", 4, 0.05), m
    kl = [r["kl"] for r in metrics_log(tmp_path / "rloo") if "kl" in r]
    assert len(kl) == 4 and abs(kl[0]) < 1e-4 and abs(kl[-1]) > 1e-4, kl


# ------------------------------------------------------------------------------------------------------- PPO


def test_lora_ppo_against_the_reward_model_trains_policy_and_value_head(smollm2, reward_model, tmp_path, monkeypatch):
    seen = {}
    train = ppo_trainer.PPOTrainer.train

    def spy(self, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        result = train(self, *args, **kwargs)
        after = dict(self.unwrapped.named_parameters())
        seen["changed"] = {n for n in before if not torch.equal(before[n], after[n])}
        seen["names"] = set(before)
        return result

    monkeypatch.setattr(ppo_trainer.PPOTrainer, "train", spy)
    result = hfrecipes.ppo(
        "tiny/ppo",
        model_name_or_path=str(smollm2),
        reward_model_path=str(reward_model.output_dir),
        reward_funcs=None,  # the reward model alone (the recipe adds the answer check, which reads a column)
        gold_dataset_name=None,  # the gold check's 200 validation replies, twice, would outweigh the two steps
        dataset_columns=None,
        dataset_name=str(prompts_file(tmp_path / "prompts.jsonl", 32)),
        dataset_test_split="",
        output_dir=str(tmp_path / "ppo"),
        **top_lora(smollm2),
        value_model="head",
        per_device_train_batch_size=4,
        num_mini_batches=2,
        num_ppo_epochs=1,
        max_new_tokens=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
    )
    rec = result.record
    assert rec["model"]["reference"] == "adapter-disabled policy"
    assert rec["model"]["value_model"] == "linear head on the policy's last hidden state"
    assert rec["metrics"]["steps"] == 2 and rec["parent"]["stage"] == "base"

    # the policy's adapters and the value head train; the base stays as loaded
    changed, names = seen["changed"], seen["names"]
    assert {"value_head.weight", "value_head.bias"} <= changed
    lora_b = {n for n in names if "lora_B" in n}
    assert lora_b and lora_b <= changed
    assert not [n for n in changed if "lora_" not in n and not n.startswith("value_head.")]
    assert lora_b_moved(result.output_dir)

    # KL to the reference is logged every step: zero on the first rollout (a fresh adapter is the identity), finite
    # and off zero once the policy has been updated
    logs = [r for r in metrics_log(result.output_dir) if "kl" in r]
    assert len(logs) == 2
    for key in ("kl", "value_loss", "score", "reward/reward_model", "first_minibatch/max_ratio_dev"):
        assert all(math.isfinite(r[key]) for r in logs), key
    assert abs(logs[0]["kl"]) < 1e-4, logs[0]
    assert logs[1]["kl"] != 0 and rec["metrics"]["kl"] == logs[1]["kl"]
    assert all(r["first_minibatch/max_ratio_dev"] < 1e-4 for r in logs)


# -------------------------------------------------------------------------------------------------- distill


def test_lora_distillation_brings_a_half_size_student_toward_smollm2(smollm2, tmp_path):
    """SmolLM2-135M-Instruct teaches a student of half its decoder layers (its first and last six, so the student
    shares its tokenizer and starts close enough to learn from in a few steps) through LoRA: the student ranks first
    more of the teacher's held-out reply tokens, and its distributions come closer to the teacher's."""
    layers = json.loads((smollm2 / "config.json").read_text())["num_hidden_layers"]
    student = fewer_layers(smollm2, tmp_path / "student", keep=[*range(6), *range(layers - 6, layers)])
    rows = {
        name: [{"prompt": prompt(a, b)} for a, b in pairs]
        for name, pairs in (("train", SPLITS["rl"][:32]), ("test", SPLITS["heldout"][:8]))
    }
    result = hfrecipes.distill(
        "smollm2-135m-instruct/distill/cpu_lora",
        model_name_or_path=str(student),
        teacher_model_name_or_path=str(smollm2),
        dataset_name=str(pairs_folder(tmp_path / "prompts", rows["train"], rows["test"])),
        max_eval_samples=8,
        eval_max_new_tokens=8,
        max_completion_length=8,
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=2e-3,
        output_dir=str(tmp_path / "distill"),
        logging_steps=1,
        save_strategy="no",
    )
    rec, h = result.record, result.record["metrics"]["heldout"]
    assert h["after"] > h["before"] + 0.1 and h["detail"]["kl_after"] < h["detail"]["kl_before"], h
    assert lora_b_moved(result.output_dir) and rec["model"]["adapter"]["type"] == "lora"
    assert rec["teacher"]["source"] == str(smollm2) and rec["teacher"]["stage"] == "base"
    assert rec["compute"]["flops_teacher"] == 2 * rec["teacher"]["params_total"] * rec["data"]["tokens_seen"]
    assert rec["model"]["params_total"] < 0.6 * rec["teacher"]["params_total"]

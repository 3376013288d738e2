"""PPO: the arithmetic and the advantages phase by hand, the Trainer internals it drives, the first update's ratio,
reward rising on the tiny chain, LoRA, resume, bad input."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch

import hfrecipes
from hfrecipes import modeling, rewards
from hfrecipes.errors import UsageError
from hfrecipes.stages import ppo_trainer, trainer_internals
from hfrecipes.stages.ppo_trainer import Rollout, Scores
from hfrecipes.tiny import task

# Small rollouts so the whole file stays within a few minutes on one core: 32 replies per step, 2 x 2 updates.
FAST = dict(
    per_device_train_batch_size=16,
    num_mini_batches=2,
    num_ppo_epochs=2,
    max_new_tokens=14,
    heldout_max_prompts=96,
    save_strategy="no",
    logging_steps=1,
    # the reward model alone, with the light KL these tests were sized for (the tiny recipe adds an accuracy reward)
    reward_funcs=None,
    dataset_columns=None,
    kl_coef=0.05,
)


def _parity_pairs(pairs: list[tuple[int, int]], seed: int) -> list[dict]:
    """Replies that differ in the sum's last digit only: odd is chosen, even rejected. The tiny task's own preference
    (the right sum above a wrong one) needs an SFT model past its accuracy transition, which the shared SFT fixture is
    not: a reward model on that body ranks those pairs near chance, and PPO against it finds a gain on some runs and
    none on others. A last digit is one token the body reads and the policy can move, so the reward model learns it
    in 100 steps and PPO's effect can be checked outside the reward model: the share of odd last digits."""
    rng = random.Random(f"parity-{seed}")
    rows = []
    for a, b in pairs:
        tens = (a + b) // 10
        even, odd = rng.choice((0, 2, 4, 6, 8)), rng.choice((1, 3, 5, 7, 9))
        rows.append(
            {
                "prompt": [{"role": "user", "content": task.question(a, b)}],
                "chosen": [{"role": "assistant", "content": task.answer(a, b, 10 * tens + odd)}],
                "rejected": [{"role": "assistant", "content": task.answer(a, b, 10 * tens + even)}],
            }
        )
    return rows


def _odd_share(model_dir, prompts: list) -> float:
    """Share of greedy replies whose number before the final full stop ends in an odd digit."""
    from transformers import AutoModelForCausalLM

    from hfrecipes.evaluation import greedy_replies

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    replies = greedy_replies(model, modeling.load_tokenizer(model_dir), prompts, max_new_tokens=14)
    last = [re.search(r"(\d)\.\s*$", r.strip()) for r in replies]
    return sum(m is not None and int(m.group(1)) % 2 == 1 for m in last) / len(prompts)


@pytest.fixture(scope="module")
def chain(tiny_sft, tmp_path_factory):
    """A weak tiny SFT model (120 steps: it has not passed its accuracy transition) and a reward model on top that
    prefers an odd last digit in the sum (see `_parity_pairs`)."""
    root = tmp_path_factory.mktemp("ppo-chain")
    data = root / "parity"
    data.mkdir()
    splits = task.split_pairs()
    for name, pairs in (("train", splits["sft"]), ("test", splits["validation"])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _parity_pairs(pairs, seed=0)))
    reward = hfrecipes.reward(
        "tiny/reward",
        model_name_or_path=str(tiny_sft.output_dir),
        dataset_name=str(data),
        max_steps=100,
        output_dir=str(root / "reward"),
    )
    return {
        "sft": str(tiny_sft.output_dir),
        "reward": str(reward.output_dir),
        "root": root,
        "reward_record": reward.record,
    }


def _ppo(chain, out, **overrides):
    kw = {**FAST, "model_name_or_path": chain["sft"], "reward_model_path": chain["reward"], "output_dir": str(out)}
    return hfrecipes.ppo("tiny/ppo", **{**kw, **overrides})


def _logs(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ arithmetic by hand


def test_gae_and_whitening_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # 9.0 lies past the second reply's end: ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo_trainer.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_t = r_t + 0.9 V_{t+1} - V_t (V = 0 after a reply's last token); A_t = delta_t + 0.72 A_{t+1}
    a02 = 1.0 - 0.3
    a01 = (0.9 * 0.3 - 0.2) + 0.72 * a02
    a00 = (0.9 * 0.2 - 0.1) + 0.72 * a01
    a11 = -0.5
    a10 = (0.5 + 0.9 * 0.5 - 0.4) + 0.72 * a11
    expected = torch.tensor([[a00, a01, a02], [a10, a11, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, expected + values * mask, atol=1e-6)

    flat = [a00, a01, a02, a10, a11]
    mean, std = statistics.mean(flat), statistics.stdev(flat)  # the unbiased variance, as TRL's masked_whiten
    white = ppo_trainer.whiten(advantages, mask) * mask
    assert torch.allclose(
        white,
        torch.tensor([[(a - mean) / std for a in flat[:3]], [*((a - mean) / std for a in flat[3:]), 0.0]]),
        atol=1e-5,
    )
    assert torch.allclose(
        ppo_trainer.whiten(advantages, mask, shift_mean=False) * mask, (white + mean) * mask, atol=1e-5
    )


def test_advantages_phase_by_hand():
    """KL penalty on every reply token, the score on the last, GAE, then whitening: two replies, the second one token
    shorter (its padded position holds numbers that must be ignored)."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rollout = Rollout(
        query=torch.zeros(2, 1, dtype=torch.long),
        query_mask=torch.ones(2, 1, dtype=torch.long),
        response=torch.zeros(2, 3, dtype=torch.long),
        response_mask=mask,
        ended=torch.tensor([True, True]),
        logprobs=torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]]),
        ref_logprobs=torch.tensor([[-1.2, -1.5, -0.5], [-1.0, -1.0, -0.1]]),
        values=torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]]),
    )
    scores = Scores(total=torch.tensor([1.0, 0.5]), reward_means={})
    out = ppo_trainer.estimate_advantages(rollout, scores, kl_coef=0.1, gamma=0.9, lam=0.8, whiten_rewards=False)
    assert torch.allclose(out.kl, torch.tensor([[0.2, -0.5, 0.0], [-0.5, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(out.non_score, torch.tensor([[-0.02, 0.05, 0.0], [0.05, 0.0, 0.0]]), atol=1e-6)
    # token rewards: [-0.02, 0.05, 0.0 + 1.0] and [0.05, 0.0 + 0.5]; A_t = r_t + 0.9 V_{t+1} - V_t + 0.72 A_{t+1}
    a02 = 1.0 - 0.3
    a01 = (0.05 + 0.9 * 0.3 - 0.2) + 0.72 * a02
    a00 = (-0.02 + 0.9 * 0.2 - 0.1) + 0.72 * a01
    a11 = 0.5 - 0.5
    a10 = (0.05 + 0.9 * 0.5 - 0.4) + 0.72 * a11
    raw = torch.tensor([[a00, a01, a02], [a10, a11, 0.0]])
    assert torch.allclose(out.returns, raw + torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]]), atol=1e-6)
    flat = [a00, a01, a02, a10, a11]
    mean, std = statistics.mean(flat), statistics.stdev(flat)
    white = [[(a - mean) / std for a in flat[:3]], [*((a - mean) / std for a in flat[3:]), 0.0]]
    assert torch.allclose(out.advantages, torch.tensor(white), atol=1e-5)


def test_clipped_losses_and_adaptive_kl_by_hand():
    clip = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    # First update: the same log-probabilities, so the ratio is 1 and nothing is clipped.
    loss, s = ppo_trainer.ppo_losses(old, old, torch.tensor([[1.0, -1.0]]), old, old, old, mask, **clip)
    assert s["ratio"] == 1 and s["max_ratio_dev"] == 0 and s["clipfrac"] == 0 and s["approxkl"] == 0
    # Ratio 1.5 with a positive advantage is clipped to 1.2; a value moved by 0.5 towards return 1 is clipped to 0.2.
    new = torch.full((1, 2), math.log(1.5))
    value, ones = torch.full((1, 2), 0.5), torch.ones(1, 2)
    loss, s = ppo_trainer.ppo_losses(new, old, ones, value, old, ones, mask, **clip)
    assert s["clipfrac"] == 1 and s["policy_loss"] == pytest.approx(-1.2)
    assert s["value_loss"] == pytest.approx(0.5 * (1 - 0.2) ** 2) and s["value_clipfrac"] == 1
    assert loss == pytest.approx(-1.2 + 0.1 * 0.5 * 0.8**2)
    # Adaptive KL: the proportional error is clipped to +-0.2 and scaled by replies / horizon.
    assert ppo_trainer.adapt_kl_coef(0.1, kl=12.0, target=6.0, horizon=10000, n_steps=64) == pytest.approx(
        0.1 * (1 + 0.2 * 64 / 10000)
    )
    assert ppo_trainer.adapt_kl_coef(0.1, kl=5.4, target=6.0, horizon=100, n_steps=10) == pytest.approx(
        0.1 * (1 - 0.1 * 0.1)
    )


# ------------------------------------------------------------------------------------ Trainer internals


def test_trainer_internals_match_the_installed_transformers(tmp_path):
    """PPO's loop drives private parts of `transformers.Trainer`; each one it needs is there, with a signature that
    takes the call made. On a transformers release that changed one, this fails and names it."""
    import transformers

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = transformers.Trainer(model=torch.nn.Linear(2, 1), args=args)
    problems = trainer_internals.check(trainer)
    assert problems == [], "\n".join(problems)


def test_trainer_internals_check_names_what_changed(tmp_path):
    import transformers

    class Changed(transformers.Trainer):
        def _load_rng_state(self, checkpoint, strict):  # a new required argument
            pass

        _save_checkpoint = None  # gone

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = Changed(model=torch.nn.Linear(2, 1), args=args)
    del trainer.current_flos
    problems = trainer_internals.check(trainer)
    assert len(problems) == 3, problems
    assert "_load_rng_state" in problems[0] and "strict" in problems[0]
    assert "_save_checkpoint: missing" in problems[1]
    assert "current_flos: attribute missing" in problems[2]


# --------------------------------------------------------------------------------------------- training


def test_ppo_raises_heldout_reward_with_bounded_kl(chain):
    # The recipe's KL coefficient: with the light one the policy also finds replies like "99 plus" that the reward
    # model scores high, far from the reference.
    kl_coef = 0.2
    out = _ppo(chain, chain["root"] / "ppo", max_steps=20, learning_rate=2e-4, kl_coef=kl_coef)
    m = out.record["metrics"]
    h = m["heldout"]
    print("ppo tiny:", {k: v for k, v in h.items() if k != "detail"}, {k: v for k, v in m.items() if k != "heldout"})
    assert m["steps"] == 20 and h["metric"] == "heldout_reward" and h["examples"] == 96
    assert h["after"] > h["before"] + 0.03, h
    # What PPO maximises, on prompts it never trained on: the score less kl_coef x the KL to the reference. It rose
    # from its start (the policy is the reference there: KL 0), so the KL the policy took is bought by the score
    # it gained, KL < gain / kl_coef, and it is not zero: the policy moved.
    assert h["after"] - kl_coef * h["detail"]["kl"] > h["before"], h
    assert h["detail"]["kl"] > 0 and math.isfinite(m["kl"]), m
    assert h["detail"]["accuracy_before"] is not None and h["detail"]["accuracy"] is not None
    # The reward model learnt its preference, and the policy moved towards it on prompts it never trained on.
    rm = chain["reward_record"]["metrics"]["heldout"]
    assert rm["after"] > 0.9, rm
    prompts = [r["prompt"] for r in task.prompt_rows(task.split_pairs()["heldout"][:96])]
    before, after = _odd_share(chain["sft"], prompts), _odd_share(out.output_dir, prompts)
    print("odd last digit, greedy, held-out:", before, "->", after)
    # An SFT model's greedy sums may end in an odd digit on most prompts already; PPO brings the rest.
    assert after > 0.9 and after >= before, (before, after)
    logs = [r for r in _logs(out.output_dir) if "score" in r]
    assert len(logs) == 20
    for key in (
        "score",
        "non_score_reward",
        "kl",
        "clipfrac",
        "approxkl",
        "value_loss",
        "explained_variance",
        "entropy",
        "response_length",
        "first_minibatch/max_ratio_dev",
    ):
        assert all(math.isfinite(r[key]) for r in logs), key
    # every reply's reward carried the penalty asked for: kl_coef x its KL to the reference
    assert all(r["non_score_reward"] == pytest.approx(-kl_coef * r["kl"], rel=1e-5, abs=1e-7) for r in logs), logs
    # On the first minibatch of the first epoch the policy is the one that sampled: ratio 1, nothing clipped.
    assert all(r["first_minibatch/max_ratio_dev"] < 1e-5 and r["first_minibatch/clipfrac"] == 0 for r in logs)
    assert out.record["model"]["reference"] == "separate copy of the parent"
    assert out.record["model"]["value_model"] == f"critic from {chain['reward']}"
    assert out.record["data"]["tokens_seen"] > 0 and out.record["status"] == "complete"
    assert (out.output_dir / "model.safetensors").is_file() and (out.output_dir / "README.md").is_file()


def test_lora_keeps_base_bit_identical_and_moves_adapter(chain, tmp_path, monkeypatch):
    seen = {}
    train = ppo_trainer.PPOTrainer.train

    def spy(self, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in self.model.policy.named_parameters()}
        result = train(self, *args, **kwargs)
        after = dict(self.unwrapped.policy.named_parameters())
        seen["base_changed"] = [n for n in before if "lora_" not in n and not torch.equal(before[n], after[n])]
        seen["lora_moved"] = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
        return result

    monkeypatch.setattr(ppo_trainer.PPOTrainer, "train", spy)
    out = _ppo(
        chain,
        tmp_path / "lora",
        use_peft=True,
        value_model="head",
        max_steps=3,
        learning_rate=1e-3,
        lora_target_modules=["q_proj", "v_proj"],
    )
    assert seen["base_changed"] == [] and seen["lora_moved"]
    assert out.record["model"]["reference"] == "adapter-disabled policy"
    assert out.record["model"]["adapter"]["type"] == "lora"
    assert (out.output_dir / "adapter_model.safetensors").is_file()


def test_resume_from_checkpoint_matches_an_uninterrupted_run(chain, tmp_path):
    kw = dict(
        value_model="head",
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        heldout_max_prompts=8,
        learning_rate=1e-4,
    )
    whole = _ppo(chain, tmp_path / "whole", **kw)
    # An interrupted run: its folder holds the first checkpoint and the run marker, nothing else.
    cut = tmp_path / "cut"
    shutil.copytree(whole.output_dir / "checkpoint-1", cut / "checkpoint-1")
    (cut / ".hfrecipes-run.json").write_text(json.dumps({"stage": "ppo"}))
    resumed = _ppo(chain, cut, **kw)
    assert resumed.record["metrics"]["steps"] == 2
    assert [r["step"] for r in _logs(cut) if "score" in r] == [2]
    from safetensors.torch import load_file

    a, b = load_file(whole.output_dir / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_reward_model_with_another_tokenizer_reads_text(chain, tmp_path):
    """The reward model re-tokenizes the decoded reply with its own tokenizer; the critic then starts from the
    policy (a critic must read the policy's tokens)."""
    from transformers import AutoModelForSequenceClassification

    from hfrecipes.tiny import tiny_config
    from hfrecipes.tiny.corpus import documents
    from hfrecipes.tiny.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in documents(seed=0)[:300]], vocab_size=600)
    config = tiny_config(vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id, num_hidden_layers=1)
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm_dir = tmp_path / "other-rm"
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    assert len(tok) != len(modeling.load_tokenizer(chain["sft"]))

    out = _ppo(chain, tmp_path / "ppo", reward_model_path=str(rm_dir), max_steps=1, heldout_max_prompts=8)
    assert out.record["model"]["value_model"] == f"critic from {chain['sft']}"
    assert math.isfinite(out.record["metrics"]["heldout"]["after"])
    # The score is the reward model's on the re-tokenized text of the reply.
    scorer = rewards.reward_model_scorer(str(rm_dir))
    prompt = [{"role": "user", "content": "What is 1 plus 2?"}]
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "1 plus 2 is 3."}], tokenize=False)
    with torch.no_grad():
        direct = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert scorer([prompt], [[{"role": "assistant", "content": "1 plus 2 is 3."}]])[0] == pytest.approx(
        direct, abs=1e-5
    )


# -------------------------------------------------------------------------------------------------- bad input

BAD = [
    # (overrides, words the message must contain)
    ({"reward_model_path": None}, ["reward_model_path", "reward_funcs"]),
    ({"reward_model_path": "SFT"}, ["reward_model_path", "sequence classifier", "LlamaForCausalLM"]),
    ({"reward_model_path": "/no/such/reward"}, ["reward_model_path", "does not exist"]),
    ({"reward_funcs": ["accuracy"], "reward_weights": [1.0]}, ["reward_weights", "2 reward"]),
    ({"reward_funcs": ["no_such_reward"]}, ["no_such_reward", "accuracy"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[w[1] for _, w in BAD])
def test_bad_input_is_one_clear_error_before_models_load(chain, tmp_path, overrides, words, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(modeling, "load_pretrained", no_loading)
    overrides = {k: chain["sft"] if v == "SFT" else v for k, v in overrides.items()}
    with pytest.raises(UsageError) as e:
        _ppo(chain, tmp_path / "bad", **overrides)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_bad_config_values_are_refused():
    with pytest.raises(UsageError, match="temperature"):
        hfrecipes.parse_stage_args("ppo", "tiny/ppo", temperature=0.0)
    with pytest.raises(UsageError, match="value_model"):
        hfrecipes.parse_stage_args("ppo", "tiny/ppo", value_model="shared")

"""DPO trains for real on the tiny preference pairs, against the SFT model as reference.

Held-out numbers are measured on 300 problems no stage trains on, before and after training.
"""

from __future__ import annotations

import pytest
from conftest import lm_head_kind

import hfrecipes
from hfrecipes import modeling, record
from hfrecipes.stages.dpo import LOSS_TYPES


@pytest.fixture
def model_loads(monkeypatch):
    """How many times a stage loads a checkpoint (policy, reference, ...)."""
    calls = []
    original = modeling.load_pretrained

    def counting(*args, **kwargs):
        calls.append(kwargs.get("head", "causal_lm"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_pretrained", counting)
    return calls


def _check_learned(rec):
    h = rec["metrics"]["heldout"]
    assert h["metric"] == "rewards/accuracies" and h["examples"] > 0
    before, after = h["detail"]["before"], h["detail"]["after"]
    assert h["after"] == after["rewards/accuracies"] and h["before"] == before["rewards/accuracies"]
    assert abs(before["rewards/margins"]) < 1e-4, "before training the policy is the reference: margins are zero"
    # beta 0.1: the margins became positive, the policy moved towards the chosen replies. How far 30 steps take it
    # depends on the trajectory (the CPU's float kernels, the seed), LoRA's most of all, so the bar is a move far
    # above the untrained policy's zero margins, not a size read off one run; a policy that stays put, or moves
    # the wrong way, is below it.
    assert after["rewards/margins"] > 5e-3, after
    # the chosen reply's log-probability rises relative to the rejected one's
    assert after["logps/gap"] > before["logps/gap"], (before, after)


def test_full_dpo_margins_become_positive(tiny_sft, tmp_path, model_loads, captured_trainers):
    result = hfrecipes.dpo(
        "tiny/dpo",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "dpo"),
        max_steps=30,
        learning_rate=5e-4,
        max_train_samples=960,
        logging_steps=10,
        save_strategy="no",
    )
    rec = result.record
    _check_learned(rec)
    assert model_loads == ["causal_lm", "causal_lm"], "full DPO holds a frozen copy of the parent as reference"
    assert captured_trainers[0].ref_model is not None
    # on a CPU both the policy and the reference score tokens through the logits head
    assert lm_head_kind(captured_trainers[0].model) == lm_head_kind(captured_trainers[0].ref_model) == "logits"
    assert rec["model"]["reference"] == "separate copy of the parent"
    assert rec["metrics"]["loss_type"] == ["sigmoid", "sft"]
    assert [r["stage"] for r in record.lineage(rec)] == ["pretrain", "sft", "dpo"]
    assert (result.output_dir / "model.safetensors").is_file()


def test_lora_dpo_needs_no_second_model_copy(tiny_sft, tmp_path, model_loads, captured_trainers):
    result = hfrecipes.dpo(
        "tiny/dpo_lora",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "dpo_lora"),
        max_steps=30,
        max_train_samples=960,
        logging_steps=10,
        save_strategy="no",
    )
    rec = result.record
    assert model_loads == ["causal_lm"], "LoRA DPO loads the checkpoint once"
    assert captured_trainers[0].ref_model is None, "the reference is the policy with its adapter disabled"
    assert rec["model"]["reference"] == "adapter-disabled policy"
    _check_learned(rec)
    assert (result.output_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_every_trl_loss_type_is_a_recipe_key(loss):
    (_, config, _), resolved = hfrecipes.parse_stage_args("dpo", "tiny/dpo", ["--loss_type", loss])
    assert config.loss_type == [loss]


def test_a_second_loss_type_trains_with_trls_lm_head(tiny_sft, tmp_path, captured_trainers):
    result = hfrecipes.dpo(
        "tiny/dpo",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "ipo"),
        loss_type=["ipo"],
        logits_lm_head=False,  # TRL's fused head, as on a GPU
        max_steps=3,
        max_train_samples=96,
        save_strategy="no",
    )
    assert result.record["metrics"]["loss_type"] == ["ipo"] and result.record["status"] == "complete"
    trainer = captured_trainers[0]
    assert lm_head_kind(trainer.model) == lm_head_kind(trainer.ref_model) == "trl"

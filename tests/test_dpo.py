"""DPO trains for real on the tiny preference pairs, against the SFT model as reference.

Held-out numbers are measured on 300 problems no stage trains on, before and after training.
"""

from __future__ import annotations

import pytest
from conftest import default_lm_head, dpo_margins, lm_head_kind

import hfrecipes
from hfrecipes import modeling, record
from hfrecipes.data import tiny_rows
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


ZERO = 1e-4  # a margin this small is rounding: the log-probabilities of identical models differ by less


def _check_learned(result, parent):
    """Held-out margins start at zero and end clearly positive; returns the held-out block for the message."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = result.record
    h = rec["metrics"]["heldout"]
    assert h["metric"] == "rewards/accuracies" and h["examples"] > 0
    before, after = h["detail"]["before"], h["detail"]["after"]
    assert h["after"] == after["rewards/accuracies"] and h["before"] == before["rewards/accuracies"]
    assert abs(before["rewards/margins"]) < ZERO, "before training the policy is the reference: margins are zero"
    # the chosen reply's log-probability rises relative to the rejected one's
    assert after["rewards/margins"] > 0 and after["logps/gap"] > before["logps/gap"], (before, after)
    # The saved policy's margin on each held-out pair (against the parent, its reference): their mean is positive
    # beyond rounding and by more than two standard errors over the pairs. How far a few steps move it depends on
    # the trajectory (the device's float kernels, LoRA or full), so the bar is the pairs' own spread, not a size
    # read off one run.
    reference = AutoModelForCausalLM.from_pretrained(parent).eval()
    if (result.output_dir / "adapter_config.json").is_file():
        policy, reference = PeftModel.from_pretrained(reference, result.output_dir).eval(), None
    else:
        policy = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    rows = tiny_rows("preference", "test")
    margins = dpo_margins(policy, modeling.load_tokenizer(parent), rows, rec["recipe"]["values"]["beta"], reference)
    error = margins.std().item() / len(rows) ** 0.5
    print("dpo held-out margins:", margins.mean().item(), "+-", error, after)
    assert margins.mean().item() > max(2 * error, ZERO), (margins.mean().item(), error)


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
    _check_learned(result, tiny_sft.output_dir)
    assert model_loads == ["causal_lm", "causal_lm"], "full DPO holds a frozen copy of the parent as reference"
    assert captured_trainers[0].ref_model is not None
    # the policy and the reference score tokens through this machine's default head (the logits head on a CPU)
    trainer = captured_trainers[0]
    assert lm_head_kind(trainer.model) == lm_head_kind(trainer.ref_model) == default_lm_head()
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
    _check_learned(result, tiny_sft.output_dir)
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

"""The logits LM head (`stages/common.py`) gives what TRL's fused LM head gives: the same per-token fields, loss
and gradients, on every input shape the SFT and DPO trainers pass, for full and LoRA models."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from hfrecipes.stages.common import use_logits_lm_head
from hfrecipes.tiny import tiny_config

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _batch(all_masked: bool = False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (4, 24), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 18:] = 0  # right padding
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :10] = -100  # a prompt
    if all_masked:
        labels[:] = -100
    return ids, attention_mask, labels


def _pair(peft: bool, temperature: float = 1.0, entropy_grad: bool = False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    fused, plain = model, copy.deepcopy(model)
    if peft:  # as the trainers do: the head goes on the PEFT base, LoRA on top (lm_head included)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        fused, plain = (get_peft_model(m, copy.deepcopy(lora)) for m in (fused, plain))
        plain.load_state_dict(fused.state_dict())
    add_fused_lm_head(fused.get_base_model() if peft else fused, temperature, outputs=OUTPUTS)
    add_fused_lm_head(plain.get_base_model() if peft else plain, temperature, outputs=OUTPUTS)
    assert use_logits_lm_head(plain.get_base_model() if peft else plain, OUTPUTS, temperature, entropy_grad)
    return fused, plain


CASES = [  # (name, peft, labels kwarg, num_items_in_batch, every label masked, temperature, entropy in the loss)
    ("labels", False, "labels", None, False, 1.0, False),
    ("shift_labels", False, "shift_labels", None, False, 1.0, False),
    ("num_items_in_batch", False, "labels", 50, False, 1.0, False),
    ("all_masked", False, "labels", None, True, 1.0, False),
    ("lora", True, "labels", None, False, 1.0, False),
    ("grpo_temperature_entropy_bonus", False, "labels", None, False, 0.7, True),
]


@pytest.mark.parametrize(
    "name, peft, label_key, num_items, all_masked, temperature, entropy_grad", CASES, ids=[c[0] for c in CASES]
)
def test_logits_head_matches_trls_fused_head(name, peft, label_key, num_items, all_masked, temperature, entropy_grad):
    fused, plain = _pair(peft, temperature, entropy_grad)
    ids, attention_mask, labels = _batch(all_masked)
    if label_key == "shift_labels":
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    kwargs = {"input_ids": ids, "attention_mask": attention_mask, label_key: labels, "fused_lm_head": True}
    if num_items is not None:
        kwargs["num_items_in_batch"] = num_items
    a, b = fused(**kwargs), plain(**kwargs)
    for field in (*OUTPUTS, "label_mask", "loss"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.shape == y.shape and x.dtype == y.dtype, field
        torch.testing.assert_close(y.float(), x.float(), atol=2e-5, rtol=1e-5, msg=field)
    assert b.loss.requires_grad and b.entropy.requires_grad == entropy_grad
    if entropy_grad:  # an entropy bonus, as GRPO's `entropy_coef` adds
        (a.loss - 0.1 * a.entropy.sum()).backward()
        (b.loss - 0.1 * b.entropy.sum()).backward()
    else:
        a.loss.backward()
        b.loss.backward()
    for (n, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=n)
    if all_masked:
        assert b.loss.item() == 0.0
    # without `fused_lm_head` both are the model's own forward
    torch.testing.assert_close(plain(input_ids=ids).logits, fused(input_ids=ids).logits, atol=0, rtol=0)


def test_models_whose_logits_trl_transforms_keep_trls_head():
    config = tiny_config()
    config.logit_scale = 0.5  # a multiplier TRL's head applies and a plain projection would not
    model = LlamaForCausalLM(config)
    add_fused_lm_head(model)
    forward = model.forward
    assert not use_logits_lm_head(model, ("log_probs",))
    assert model.forward == forward

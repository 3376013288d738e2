"""GRPO-style reasoning RL with verifiable rewards: sample a group of replies per prompt, score them (is the answer
right? is the format right?), and push the policy towards the replies that beat their group's mean.

Held-out pass@1 accuracy (greedy) is measured before and after training and recorded.

    hfrecipes grpo --config tiny/grpo
    hfrecipes grpo --config tiny/grpo_lora --max_steps 50
    accelerate launch -m hfrecipes grpo --config qwen2.5-0.5b-instruct/grpo/lora
"""

from __future__ import annotations

from dataclasses import dataclass

import trl

from hfrecipes import vllm_support
from hfrecipes.data import ScriptArguments
from hfrecipes.modeling import ModelConfig
from hfrecipes.report import card
from hfrecipes.stages import StageFacts, outcome_rl, trainer_internals
from hfrecipes.stages.common import FineTuneDefaults, logits_lm_heads, references_load_on_every_process

STAGE = "grpo"
# `answer` is needed too when the accuracy reward scores the replies (see `outcome_rl.run`).
FACTS = StageFacts(columns=(("prompt",),), tokens="rollouts")


@dataclass
class GRPOConfig(FineTuneDefaults, outcome_rl.OutcomeRewardOptions, trl.GRPOConfig):
    """`trl.GRPOConfig` with the fine-tuning defaults of `stages/common.py` and the keys of the outcome-reward stages
    (`outcome_rl.OutcomeRewardOptions`): the `logits_lm_head` switch, rewards chosen by name, a held-out evaluation
    before and after training, and the gold check of `hfrecipes/gold.py` (its proxy is the logged `reward`: gold
    falling while it rises is reward hacking)."""


DATACLASSES = (ScriptArguments, GRPOConfig, ModelConfig)


class GRPOTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, trl.GRPOTrainer):
    """`trl.GRPOTrainer` that owns the model card (ours is written from the stage record), loads its reference in
    full on every process (`references_load_on_every_process`) and, where `logits_lm_head` is on, scores tokens from
    plain logits."""

    def __init__(self, *args, **kwargs):
        from trl.trainer import grpo_trainer

        with references_load_on_every_process(grpo_trainer):
            super().__init__(*args, **kwargs)
        if not self.args.cast_lm_head_to_fp32:  # TRL's head then projects in fp32 outside autocast; keep it
            # the fields TRL's GRPO loss and logs read; the entropy bonus needs the entropy's gradient
            entropy_grad = self.args.entropy_coef > 0 or self.args.use_adaptive_entropy
            logits_lm_heads(self, ("log_probs", "entropy"), self.temperature, entropy_grad)
        if self.use_vllm:
            vllm_support.fit_colocate_weight_sync(self.vllm_generation)


def run(script_args: ScriptArguments, training_args: GRPOConfig, model_args: ModelConfig, recipe: dict):
    """Train with group-relative rewards and write the stage folder; returns (output_dir, record)."""
    return outcome_rl.run(STAGE, FACTS, GRPOTrainer, script_args, training_args, model_args, recipe)

"""REINFORCE Leave-One-Out (RLOO) with verifiable rewards: sample several replies per prompt, score them, and push
the policy towards each reply by how far its reward beats the mean reward of the *other* replies to the same prompt
(its leave-one-out baseline), with a KL penalty to the parent folded into the reward (`beta`).

GRPO (`stages/grpo.py`) differs in the baseline, comparing each reward with its whole group's mean (the reply's own
reward included) and dividing by the group's spread, and in adding its KL penalty (0 by default) to the per-token
loss instead. Both stages share their trunk
(`stages/outcome_rl.py`): rewards by name, vLLM colocated generation, the gold check, and held-out pass@1 (greedy)
before and after training, recorded.

    hfrecipes rloo --config tiny/rloo
    hfrecipes rloo --config tiny/rloo_lora --max_steps 50
    hfrecipes rloo --config smollm2-135m-instruct/rloo/cpu_lora
    accelerate launch --multi_gpu --num_processes 2 -m hfrecipes rloo --config tiny/rloo   # 2 CPU processes (gloo)
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

STAGE = "rloo"
# `answer` is needed too when the accuracy reward scores the replies (see `outcome_rl.run`).
FACTS = StageFacts(columns=(("prompt",),), tokens="rollouts")


@dataclass
class RLOOConfig(FineTuneDefaults, outcome_rl.OutcomeRewardOptions, trl.RLOOConfig):
    """`trl.RLOOConfig` with the fine-tuning defaults of `stages/common.py` and the keys of the outcome-reward stages
    (`outcome_rl.OutcomeRewardOptions`): the `logits_lm_head` switch, rewards chosen by name, a held-out evaluation
    before and after training, and the gold check of `hfrecipes/gold.py` (its proxy is the logged `reward`, the
    rewards before the KL penalty).

    TRL's RLOO defaults stay: `num_generations=2` (the fewest a leave-one-out baseline needs) and `beta=0.05` (a
    reference model: the parent, or the adapter-disabled policy under LoRA)."""


DATACLASSES = (ScriptArguments, RLOOConfig, ModelConfig)


class RLOOTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, trl.RLOOTrainer):
    """`trl.RLOOTrainer` that owns the model card (ours is written from the stage record), loads its reference in
    full on every process (`references_load_on_every_process`) and, where `logits_lm_head` is on, scores tokens from
    plain logits."""

    def __init__(self, *args, **kwargs):
        from trl.trainer import rloo_trainer

        with references_load_on_every_process(rloo_trainer):
            super().__init__(*args, **kwargs)
        logits_lm_heads(self, ("log_probs", "entropy"), self.temperature)  # the entropy only feeds the logs
        if self.use_vllm:
            vllm_support.fit_colocate_weight_sync(self.vllm_generation)


def reference(training_args: RLOOConfig, model_args: ModelConfig) -> str:
    """What the KL penalty measures against, as the record's model block says it (TRL loads no reference at beta 0,
    and none under LoRA, where the policy with its adapter disabled is the parent)."""
    if training_args.beta == 0:
        return "none (beta 0: no KL penalty)"
    return "adapter-disabled policy" if model_args.use_peft else "separate copy of the parent"


def run(script_args: ScriptArguments, training_args: RLOOConfig, model_args: ModelConfig, recipe: dict):
    """Train with leave-one-out baselines and write the stage folder; returns (output_dir, record)."""
    method = {
        "baseline": "leave-one-out",
        "num_generations": training_args.num_generations,
        "beta": training_args.beta,
    }
    notes = {"reference": reference(training_args, model_args)}
    return outcome_rl.run(
        STAGE, FACTS, RLOOTrainer, script_args, training_args, model_args, recipe, method=method, model_notes=notes
    )

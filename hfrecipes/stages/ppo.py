"""Proximal policy optimisation against a reward model: hfrecipes' own trainer, since TRL 1.x ships none.

The policy (the SFT checkpoint) answers prompts; a frozen reward model and/or reward functions score the answers;
a per-token KL penalty to a frozen reference keeps the policy near where it started; a value model gives GAE
advantages; clipped policy and value losses train policy and value over several epochs of minibatches. The
details follow "The N implementation details of RLHF with PPO" (Huang et al., 2024) and TRL's former
PPOTrainer: sampling from the full distribution, logits scaled by the temperature, a penalty for replies that never
end, advantages whitened, dropout off so the first minibatch's ratio is exactly 1. This file is the stage (config,
reward checks, `run()`); the arithmetic and the trainer are in `ppo_trainer.py`.

hfrecipes ppo --config tiny/ppo
hfrecipes ppo --config tiny/ppo --use_peft true --output_dir runs/tiny/ppo_lora
accelerate launch -m hfrecipes ppo --config qwen2.5-0.5b-instruct/ppo/lora
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import transformers

from hfrecipes import data, gold, modeling, record, rewards
from hfrecipes.data import ScriptArguments
from hfrecipes.errors import UsageError
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.stagerun import StageRun
from hfrecipes.stages import StageFacts
from hfrecipes.stages.common import FineTuneDefaults
from hfrecipes.stages.ppo_trainer import PPOTrainer, load_policy, load_value_model

STAGE = "ppo"
FACTS = StageFacts(columns=(("prompt",),), tokens="rollouts")


@dataclass
class PPOConfig(FineTuneDefaults, gold.GoldOptions, transformers.TrainingArguments):
    """`transformers.TrainingArguments` plus PPO's knobs, with the fine-tuning defaults of `stages/common.py` and the
    gold check of `hfrecipes/gold.py` (its proxy is the mean rollout `score`).

    One training step is one PPO iteration: each process samples `per_device_train_batch_size *
    gradient_accumulation_steps * num_mini_batches` replies (the rollout), then takes `num_ppo_epochs *
    num_mini_batches` optimizer steps on it. `max_steps`, `save_steps` and `logging_steps` count iterations.
    Changed defaults: `logging_steps=1` (every iteration is logged), `learning_rate=3e-6` (TRL's former PPO default),
    `lr_scheduler_type="constant"`, `save_strategy="no"`.
    """

    # Reward
    reward_model_path: str | None = field(
        default=None,
        metadata={"help": "A reward stage's folder (a sequence classifier with one output) that scores replies."},
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions by name (accuracy, format, length, or package.module:function)."},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward: the reward model first (when set), then reward_funcs. Default 1."},
    )
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={"help": "Subtracted from the score of a reply that never ends within max_new_tokens; null: none."},
    )
    # Value model
    value_model: Literal["critic", "head"] = field(
        default="critic",
        metadata={
            "help": "critic: a separate model with a scalar head (initialised from value_model_path); head: a linear "
            "head on the policy's last hidden state (no second model, the body is shared).",
            "choices": ["critic", "head"],
        },
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Where the critic starts. Default: the reward model when it shares the policy's tokenizer, else "
            "the policy checkpoint under a new head."
        },
    )
    # Rollouts
    max_new_tokens: int = field(default=53, metadata={"help": "Longest reply sampled."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (the logits are scaled by it)."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per rollout; one optimizer step each."})
    rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per forward pass when generating and scoring (no gradients)."}
    )
    # KL penalty
    kl_coef: float = field(default=0.05, metadata={"help": "Coefficient of the per-token KL penalty (initial)."})
    adaptive_kl: bool = field(
        default=False, metadata={"help": "Adapt kl_coef so the KL tracks target_kl (Ziegler et al., 2019)."}
    )
    target_kl: float = field(default=6.0, metadata={"help": "Target KL per reply (nats) for adaptive_kl."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (replies) of the adaptive KL controller."})
    # Advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    # Evaluation
    heldout_max_prompts: int | None = field(
        default=500, metadata={"help": "Held-out prompts scored before and after training (greedy replies)."}
    )
    # Changed defaults
    learning_rate: float = field(default=3e-6, metadata={"help": "Learning rate of policy and value model."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N PPO iterations."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints: no, steps or epoch."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_mini_batches < 1 or self.num_ppo_epochs < 1:
            raise ValueError("num_mini_batches and num_ppo_epochs must be at least 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (PPO samples its rollouts), got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    @property
    def mini_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def rollout_batch_size(self) -> int:
        """Replies each process samples per PPO iteration."""
        return self.mini_batch_size * self.num_mini_batches


DATACLASSES = (ScriptArguments, PPOConfig, ModelConfig)


def check_reward_setup(args: PPOConfig, model_args: ModelConfig) -> list:
    """Every reward setting that can be wrong, found before a model loads; returns the reward functions."""
    if not args.reward_model_path and not args.reward_funcs:
        raise UsageError(
            "ppo needs a reward: set reward_model_path (a reward stage's folder, e.g. runs/tiny/reward) and/or "
            "reward_funcs (e.g. [accuracy])."
        )
    if args.reward_model_path:
        rewards.check_reward_model(args.reward_model_path, model_args.trust_remote_code)
    funcs = [rewards.resolve(name) for name in args.reward_funcs or []]
    n = len(funcs) + bool(args.reward_model_path)
    if args.reward_weights is not None and len(args.reward_weights) != n:
        raise UsageError(
            f"reward_weights has {len(args.reward_weights)} weight(s) for {n} reward(s) (the reward model first, "
            "then reward_funcs). Give one weight per reward, or drop reward_weights."
        )
    if args.value_model == "critic" and args.value_model_path:
        modeling.check_model_path(args.value_model_path, "value_model_path")
    return funcs


def run(script_args: ScriptArguments, training_args: PPOConfig, model_args: ModelConfig, recipe: dict):
    """Optimise the policy against the rewards with PPO and write the stage folder; returns (output_dir, record)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    modeling.check_model_args(model_args, parent_stage="sft", lm_head_adapter=True)
    reward_funcs = check_reward_setup(training_args, model_args)
    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)

    # Data: prompts (and any columns the reward functions read); checked before any model exists.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, FACTS.columns)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)
    gold_set = gold.load(script_args, training_args, STAGE)

    # Tokenizer: the policy's; the reward model reads text through its own.
    tokenizer = modeling.load_stage_tokenizer(model_args)

    # Models: policy (+LoRA/QLoRA), reference, value model, reward model.
    run.start(training_args.process_index == 0)
    transformers.set_seed(training_args.seed)
    policy, reference = load_policy(training_args, model_args)
    critic, value_head, value_source = load_value_model(training_args, model_args, policy, tokenizer)
    scorer = None
    if training_args.reward_model_path:
        scorer = rewards.reward_model_scorer(training_args.reward_model_path, None, model_args.trust_remote_code)

    # Trainer.
    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        policy=policy,
        ref_model=reference,
        critic=critic,
        value_head=value_head,
        reward_scorer=scorer,
        reward_funcs=reward_funcs,
        train_dataset=train_raw,
        callbacks=run.callbacks(),
        gold=gold.new_check(gold_set, training_args, tokenizer),
    )
    run.describe_model(
        policy,
        model_args.model_name_or_path,
        model_args,
        reference="separate copy of the parent" if reference is not None else "adapter-disabled policy",
        value_model=value_source,
        reward={"reward_model": training_args.reward_model_path, "functions": training_args.reward_funcs},
    )
    before = trainer.heldout(test_raw)
    result = run.train(trainer)
    after = trainer.heldout(test_raw)

    # Save: policy (or adapter), tokenizer; record and card on the main process.
    trainer.save_model(str(training_args.output_dir))
    last = {k: (record.logged(trainer, k) or [None])[-1] for k in ("score", "kl", "clipfrac")}
    return run.finish(
        trainer,
        result,
        script_args,
        train_raw,
        cutoff=stage_cutoff,
        heldout=Heldout(
            "heldout_reward",
            after=after.get("heldout_reward"),
            before=before.get("heldout_reward"),
            examples=after.get("heldout_prompts"),
            detail={
                "accuracy_before": before.get("heldout_accuracy"),
                "accuracy": after.get("heldout_accuracy"),
                "kl": after.get("heldout_kl"),
                "response_length": after.get("heldout_response_length"),
                "replies": after.get("examples"),
            },
        )
        if after
        else None,
        metrics={
            "kl": last["kl"],
            "train_score_last_logged": last["score"],
            "train_score_first_logged": (record.logged(trainer, "score") or [None])[0],
            "clipfrac_last_logged": last["clipfrac"],
            "kl_coef_final": trainer.kl_coef,
            "rollout_batch_size": training_args.rollout_batch_size * training_args.world_size,
            **gold.metrics(trainer.gold),
        },
    )

"""Proximal policy optimisation against a reward model: hfrecipes' own trainer, since TRL 1.x ships none.

The policy (the SFT checkpoint) answers prompts; a frozen reward model and/or reward functions score the answers;
a per-token KL penalty to a frozen reference keeps the policy near where it started; a value model gives GAE
advantages; clipped policy and value losses train policy and value over several epochs of minibatches. The
details follow "The N implementation details of RLHF with PPO" (Huang et al., 2024) and TRL's former
PPOTrainer: sampling from the full distribution, logits scaled by the temperature, a penalty for replies that never
end, advantages whitened, dropout off so the first minibatch's ratio is exactly 1.

hfrecipes ppo --config tiny/ppo
hfrecipes ppo --config tiny/ppo --use_peft true --output_dir runs/tiny/ppo_lora
accelerate launch -m hfrecipes ppo --config qwen2.5-0.5b-instruct/ppo/lora
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from hfrecipes import card, data, modeling, record, rewards
from hfrecipes.data import ScriptArguments
from hfrecipes.errors import UsageError
from hfrecipes.modeling import ModelConfig
from hfrecipes.stages.common import FineTuneDefaults

STAGE = "ppo"
COLUMNS = data.STAGE_COLUMNS[STAGE]
VALUE_HEAD = "value_head.safetensors"
VALUE_MODEL = "value_model"
PPO_STATE = "ppo_state.json"


@dataclass
class PPOConfig(FineTuneDefaults, transformers.TrainingArguments):
    """`transformers.TrainingArguments` plus PPO's knobs, with the fine-tuning defaults of `stages/common.py`.

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


# ------------------------------------------------------------------------------------------- PPO arithmetic


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask, unbiased: bool = True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / std over the masked entries; the mean is added back when `shift_mean` is False."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns. `mask` marks each reply's tokens; the value after a reply's last
    token is 0 (the episode ends there)."""
    values = values * mask
    length = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def kl_penalty(logprobs, ref_logprobs):
    """Per-token KL estimate log p - log p_ref (k1), the penalty of Ziegler et al. and TRL's former PPO."""
    return logprobs - ref_logprobs


def adapt_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Adaptive KL controller (Ziegler et al., 2019): a proportional step towards `target`, error clipped to 0.2."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_steps / horizon)


def token_logprobs(logits, tokens, temperature: float):
    """Log-probabilities of `tokens` under `logits` scaled by the sampling temperature."""
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits, temperature: float):
    logits = logits.float() / temperature
    p = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask, args: PPOConfig):
    """Clipped policy loss, clipped value loss and their statistics for one micro-batch."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    clipped_values = old_values + torch.clamp(new_values - old_values, -args.cliprange_value, args.cliprange_value)
    vf1 = (new_values - returns) ** 2
    vf2 = (clipped_values - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        diff = new_logprobs - old_logprobs
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).float(), mask),
            "approxkl": 0.5 * masked_mean(diff**2, mask),
            "ratio": masked_mean(ratio, mask),
            "max_ratio_dev": ((ratio - 1).abs() * mask).max(),
            "value_clipfrac": masked_mean((vf2 > vf1).float(), mask),
            "policy_loss": pg_loss.detach(),
            "value_loss": vf_loss.detach(),
        }
    return pg_loss + args.vf_coef * vf_loss, stats


def explained_variance(values, returns, mask) -> float:
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


# ---------------------------------------------------------------------------------------------- the models


def disable_dropout(model) -> None:
    """No dropout anywhere: the log-probabilities of the rollout and of the first update must be the same numbers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def position_ids(mask):
    return (mask.long().cumsum(1) - 1).clamp(min=0)


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, so one optimizer and one DDP wrapper cover both. Its forward
    gives the policy's logits and a value for every position."""

    def __init__(self, policy, critic=None, value_head=None):
        super().__init__()
        self.policy, self.critic, self.value_head = policy, critic, value_head

    @property
    def config(self):  # Trainer reads a few settings from model.config
        return self.policy.config

    def forward(self, input_ids, attention_mask):
        pos = position_ids(attention_mask)
        if self.critic is None:
            out = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=pos,
                output_hidden_states=True,
                use_cache=False,
            )
            hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)
            return out.logits, self.value_head(hidden).squeeze(-1).float()
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
        return out.logits, critic_values(self.critic, input_ids, attention_mask, pos)


def critic_values(critic, input_ids, attention_mask, pos):
    """A value per position from a sequence classifier: its body, then its one-output `score` head on every token."""
    inner = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    body = getattr(inner, inner.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)[0]
    return inner.score(hidden).squeeze(-1).float()


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


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def load_value_model(args: PPOConfig, model_args: ModelConfig, policy, tokenizer):
    """(critic or None, value head or None, where the value model started)."""
    if args.value_model == "head":
        hidden = policy.config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(head.bias)
        return None, head, "linear head on the policy's last hidden state"
    source = args.value_model_path
    if source is None and args.reward_model_path:
        rm_tok = modeling.load_tokenizer(args.reward_model_path, model_args.trust_remote_code)
        source = args.reward_model_path if same_tokenizer(rm_tok, tokenizer) else None
    source = source or model_args.model_name_or_path
    critic = modeling.load_pretrained(
        dataclasses.replace(model_args, model_name_or_path=source), head="reward", num_labels=1
    )
    critic.config.pad_token_id = tokenizer.pad_token_id
    lora = modeling.peft_config(model_args, task_type="SEQ_CLS")
    if lora is not None:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if getattr(critic, "is_loaded_in_4bit", False) or getattr(critic, "is_loaded_in_8bit", False):
            critic = prepare_model_for_kbit_training(critic, args.gradient_checkpointing)
        critic = get_peft_model(critic, lora)
    return critic, None, f"critic from {source}"


def load_policy(args: PPOConfig, model_args: ModelConfig):
    """(policy, reference or None): under LoRA the reference is the policy with its adapter disabled."""
    policy = modeling.load_pretrained(model_args)
    lora = modeling.peft_config(model_args)
    if lora is None:
        reference = modeling.load_pretrained(model_args).eval().requires_grad_(False)
        return policy, reference
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False):
        policy = prepare_model_for_kbit_training(policy, args.gradient_checkpointing)
    return get_peft_model(policy, lora), None


# ---------------------------------------------------------------------------------------------- the trainer


class PPOTrainer(card.OwnsCard, transformers.Trainer):
    """PPO on `transformers.Trainer`: its accelerator, optimizer, scheduler, callbacks, logging and checkpoints;
    `train()` is the PPO loop (rollout, score, advantages, epochs of clipped updates)."""

    def __init__(
        self,
        args: PPOConfig,
        processing_class,
        policy,
        ref_model,
        critic,
        value_head,
        reward_scorer,
        reward_funcs: list,
        train_dataset,
        callbacks=None,
    ):
        for m in (policy, ref_model, critic):
            if m is not None:
                disable_dropout(m)
        model = PolicyAndValue(policy, critic, value_head)
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, callbacks=callbacks
        )
        self.ref_model = ref_model.to(self.accelerator.device) if ref_model is not None else None
        self.reward_scorer = reward_scorer
        if reward_scorer is not None:
            reward_scorer.model.to(self.accelerator.device)
        self.reward_funcs = reward_funcs
        names = (["reward_model"] if reward_scorer is not None else []) + [f.__name__ for f in reward_funcs]
        self.reward_names = names
        self.reward_weights = list(args.reward_weights or [1.0] * len(names))
        self.kl_coef = args.kl_coef
        self.eos_id = processing_class.eos_token_id
        self.pad_id = processing_class.pad_token_id if processing_class.pad_token_id is not None else self.eos_id

    # -- models ---------------------------------------------------------------------------------------------

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model_wrapped)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference: a separate copy, or the policy with its LoRA adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.unwrapped.policy.disable_adapter():
                yield self.unwrapped.policy

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy (full weights, or the adapter) and tokenizer; a checkpoint also holds the value model and the
        KL coefficient, so training resumes where it stopped."""
        from safetensors.torch import save_file

        output_dir = Path(output_dir or self.args.output_dir)
        model = self.unwrapped
        if self.args.should_save:
            model.policy.save_pretrained(output_dir, safe_serialization=True)
            self.processing_class.save_pretrained(output_dir)
            record.drop_pickles(output_dir)
            if _internal_call:
                if model.critic is not None:
                    model.critic.save_pretrained(output_dir / VALUE_MODEL, safe_serialization=True)
                else:
                    save_file(
                        {k: v.contiguous() for k, v in model.value_head.state_dict().items()}, output_dir / VALUE_HEAD
                    )
                (output_dir / PPO_STATE).write_text(json.dumps({"kl_coef": self.kl_coef}) + "\n")
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, checkpoint: str) -> None:
        """Policy, value model and KL coefficient from a checkpoint of this stage (before `prepare`)."""
        from safetensors.torch import load_file

        ckpt = Path(checkpoint)
        model = self.model
        load_weights(model.policy, ckpt)
        if model.critic is not None:
            load_weights(model.critic, ckpt / VALUE_MODEL)
        else:
            model.value_head.load_state_dict(load_file(ckpt / VALUE_HEAD))
        if (ckpt / PPO_STATE).is_file():
            self.kl_coef = json.loads((ckpt / PPO_STATE).read_text())["kl_coef"]

    # -- rollouts -------------------------------------------------------------------------------------------

    def prompt_batches(self, batch_size: int, epoch: int) -> list[list[int]]:
        """This process's share of a seeded shuffle of the prompts in rollout batches (a partial last one dropped)."""
        world, rank = self.args.world_size, self.args.process_index
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        order = torch.randperm(len(self.train_dataset), generator=g).tolist()
        per_step = batch_size * world
        return [
            order[i + rank * batch_size : i + (rank + 1) * batch_size]
            for i in range(0, len(order) - per_step + 1, per_step)
        ]

    def encode_prompts(self, prompts: list):
        """Left-padded query ids and mask (chat template applied to conversational prompts)."""
        from hfrecipes.exporting import prompt_ids

        ids = prompt_ids(self.processing_class, prompts)
        width = max(len(x) for x in ids)
        query = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return query.to(self.accelerator.device), mask.to(self.accelerator.device)

    def generate(self, query, query_mask, greedy: bool = False):
        """Replies (right-padded), their mask (up to and including the first EOS) and whether each ended."""
        policy = self.unwrapped.policy
        was_training = policy.training
        policy.eval()
        args = self.args
        chunks = []
        with torch.no_grad():
            for i in range(0, len(query), args.rollout_forward_batch_size):
                sl = slice(i, i + args.rollout_forward_batch_size)
                # Sampling draws from the whole distribution (no top-k/top-p), the one the log-probabilities describe.
                sampling = (
                    {"do_sample": False}
                    if greedy
                    else {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0}
                )
                out = policy.generate(
                    input_ids=query[sl],
                    attention_mask=query_mask[sl],
                    max_new_tokens=args.max_new_tokens,
                    use_cache=True,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id,
                    **sampling,
                )
                chunks.append(out[:, query.shape[1] :])
        policy.train(was_training)
        width = max(c.shape[1] for c in chunks)
        response = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=self.pad_id) for c in chunks])
        is_eos = response == self.eos_id
        ended = is_eos.any(1)
        first_eos = torch.where(ended, is_eos.float().argmax(1), torch.full_like(ended, width - 1, dtype=torch.long))
        mask = torch.arange(width, device=response.device)[None, :] <= first_eos[:, None]
        response = torch.where(mask, response, torch.full_like(response, self.pad_id))
        return response, mask.long(), ended

    def forward_rollout(self, query, query_mask, response, response_mask):
        """Log-probabilities of the replies under policy and reference, and the values, without gradients."""
        model = self.unwrapped
        q = query.shape[1]
        input_ids = torch.cat([query, response], 1)
        attention = torch.cat([query_mask, response_mask], 1)
        logprobs, ref_logprobs, values = [], [], []
        with torch.no_grad():
            for i in range(0, len(query), self.args.rollout_forward_batch_size):
                sl = slice(i, i + self.args.rollout_forward_batch_size)
                logits, value = model(input_ids[sl], attention[sl])
                logprobs.append(token_logprobs(logits[:, q - 1 : -1], response[sl], self.args.temperature))
                values.append(value[:, q - 1 : -1])
                with self.reference() as ref:
                    ref_logits = ref(
                        input_ids=input_ids[sl],
                        attention_mask=attention[sl],
                        position_ids=position_ids(attention[sl]),
                        use_cache=False,
                    ).logits
                ref_logprobs.append(token_logprobs(ref_logits[:, q - 1 : -1], response[sl], self.args.temperature))
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

    def score(self, rows: list[dict[str, Any]], response, response_mask) -> tuple[Any, dict[str, Any]]:
        """The weighted sum of the rewards for each reply, and each reward's mean. The reward model reads the reply
        as text through its own tokenizer and chat template, so it need not share the policy's tokenizer."""
        tok = self.processing_class
        texts = [
            tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, response_mask, strict=True)
        ]
        prompts = [row["prompt"] for row in rows]
        completions = [
            [{"role": "assistant", "content": t}] if isinstance(p, list) else t
            for p, t in zip(prompts, texts, strict=True)
        ]
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        ids = [r[m.bool()].tolist() for r, m in zip(response, response_mask, strict=True)]
        per_reward = []
        if self.reward_scorer is not None:
            scores = []
            n = self.args.rollout_forward_batch_size
            for i in range(0, len(prompts), n):
                scores += self.reward_scorer(prompts[i : i + n], completions[i : i + n])
            per_reward.append(scores)
        for f in self.reward_funcs:
            out = f(prompts=prompts, completions=completions, completion_ids=ids, **columns)
            per_reward.append([float("nan") if v is None else v for v in out])
        table = torch.tensor(per_reward, dtype=torch.float32, device=response.device)  # rewards x replies
        weights = torch.tensor(self.reward_weights, dtype=torch.float32, device=response.device)
        total = (table * weights[:, None]).nansum(0)
        means = {f"reward/{n}": float(table[i].nanmean()) for i, n in enumerate(self.reward_names)}
        return total, {"texts": texts, **means}

    # -- the PPO loop -----------------------------------------------------------------------------------------

    def num_steps(self) -> int:
        batches = len(self.prompt_batches(self.args.rollout_batch_size, 0))
        if batches == 0:
            raise UsageError(
                f"the dataset has {len(self.train_dataset)} prompts, fewer than one rollout of "
                f"{self.args.rollout_batch_size * self.args.world_size} (per_device_train_batch_size x "
                "gradient_accumulation_steps x num_mini_batches x processes). Lower them or add prompts."
            )
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * batches)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        from transformers.trainer_utils import TrainOutput

        args = self.args
        max_steps = self.num_steps()
        updates_per_step = args.num_ppo_epochs * args.num_mini_batches
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        self.create_optimizer_and_scheduler(num_training_steps=max_steps * updates_per_step)
        self.model_wrapped, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler
        )
        model = self.model_wrapped
        self.state = transformers.TrainerState(
            stateful_callbacks=[
                c
                for c in [*self.callback_handler.callbacks, self.control]
                if isinstance(c, transformers.trainer_callback.ExportableState)
            ]
        )
        self.state.max_steps = max_steps
        self.state.logging_steps = args.logging_steps
        self.state.save_steps = args.save_steps
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        if resume_from_checkpoint:
            self.state = transformers.TrainerState.load_from_json(
                str(Path(resume_from_checkpoint) / "trainer_state.json")
            )
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_rng_state(resume_from_checkpoint)
        start_step = self.state.global_step
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        self.current_flos = 0.0
        params = sum(p.numel() for p in self.unwrapped.policy.parameters())
        losses = []
        num_tokens = self.state.log_history[-1].get("num_tokens", 0) if self.state.log_history else 0
        batches_per_epoch = len(self.prompt_batches(args.rollout_batch_size, 0))
        model.train()
        start = time.perf_counter()
        for step in range(start_step, max_steps):
            epoch, within = divmod(step, batches_per_epoch)
            rows = [self.train_dataset[i] for i in self.prompt_batches(args.rollout_batch_size, epoch)[within]]
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)

            # Rollout: sample replies, score them, log-probabilities under policy and reference, values.
            query, query_mask = self.encode_prompts([r["prompt"] for r in rows])
            response, mask, ended = self.generate(query, query_mask)
            logprobs, ref_logprobs, values = self.forward_rollout(query, query_mask, response, mask)
            scores, reward_info = self.score(rows, response, mask)
            if args.missing_eos_penalty is not None:
                scores = scores - args.missing_eos_penalty * (~ended).float()
            fmask = mask.float()

            # Rewards: KL penalty on every token, the score on the last; GAE advantages, whitened.
            kl = kl_penalty(logprobs, ref_logprobs) * fmask
            non_score = -self.kl_coef * kl
            token_rewards = non_score.clone()
            last = mask.sum(1) - 1
            token_rewards[torch.arange(len(last)), last] += scores
            if args.whiten_rewards:
                token_rewards = whiten(token_rewards, fmask, shift_mean=False) * fmask
            advantages, returns = gae(token_rewards, values, fmask, args.gamma, args.lam)
            advantages = whiten(advantages, fmask) * fmask

            # PPO epochs over shuffled minibatches; gradient accumulation over micro-batches inside each.
            stats = []
            q = query.shape[1]
            input_ids = torch.cat([query, response], 1)
            attention = torch.cat([query_mask, mask], 1)
            first = {}
            for ppo_epoch in range(args.num_ppo_epochs):
                order = torch.randperm(len(rows), device=input_ids.device)
                for mb in range(args.num_mini_batches):
                    mb_idx = order[mb * args.mini_batch_size : (mb + 1) * args.mini_batch_size]
                    micro = mb_idx.split(args.per_device_train_batch_size)
                    for k, idx in enumerate(micro):
                        sync = k == len(micro) - 1
                        ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
                        with ctx:
                            logits, new_values = model(input_ids[idx], attention[idx])
                            new_logprobs = token_logprobs(logits[:, q - 1 : -1], response[idx], args.temperature)
                            loss, s = ppo_losses(
                                new_logprobs,
                                logprobs[idx],
                                advantages[idx],
                                new_values[:, q - 1 : -1],
                                values[idx],
                                returns[idx],
                                fmask[idx],
                                args,
                            )
                            self.accelerator.backward(loss / len(micro))
                        with torch.no_grad():
                            s["entropy"] = masked_mean(
                                entropy_from_logits(logits[:, q - 1 : -1], args.temperature), fmask[idx]
                            )
                            s["loss"] = loss.detach()
                        stats.append(s)
                        if ppo_epoch == 0 and mb == 0:
                            first.setdefault("max_ratio_dev", []).append(s["max_ratio_dev"])
                            first.setdefault("clipfrac", []).append(s["clipfrac"])
                    if args.max_grad_norm:
                        self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)

            # Bookkeeping: metrics averaged over every update and process, adaptive KL, flops, logs, checkpoints.
            seq_tokens = int(attention.sum())
            mean = lambda xs: torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]).mean()  # noqa: E731
            local = {
                "score": scores.mean(),
                "non_score_reward": non_score.sum(1).mean(),
                "rlhf_reward": (non_score.sum(1) + scores).mean(),
                "kl": kl.sum(1).mean(),
                "response_length": mask.sum(1).float().mean(),
                "eos_fraction": ended.float().mean(),
                "explained_variance": torch.tensor(explained_variance(values, returns, fmask)),
                **{k: mean([s[k] for s in stats]) for k in stats[0] if k != "max_ratio_dev"},
                "first_minibatch/clipfrac": mean(first["clipfrac"]),
                **{k: torch.tensor(v) for k, v in reward_info.items() if k != "texts"},
            }
            keys = sorted(local)
            gathered = self.accelerator.gather(
                torch.stack([local[k].float().to(input_ids.device) for k in keys])[None]
            )
            logs = {k: float(v) for k, v in zip(keys, gathered.nanmean(0), strict=True)}
            dev = self.accelerator.gather(torch.stack(first["max_ratio_dev"]).max()[None].float())
            logs["first_minibatch/max_ratio_dev"] = float(dev.max())
            tokens = int(self.accelerator.gather(torch.tensor([seq_tokens], device=input_ids.device)).sum())
            num_tokens += tokens
            logs["num_tokens"] = num_tokens
            logs["kl_coef"] = self.kl_coef
            logs["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
            if args.adaptive_kl:
                n = args.rollout_batch_size * args.world_size
                self.kl_coef = adapt_kl_coef(self.kl_coef, logs["kl"], args.target_kl, args.kl_horizon, n)
            # generation (2N per token) + three forwards (policy, reference, value) + epochs of forward/backward
            self.current_flos += float(params * tokens * (2 + 6 + 6 * args.num_ppo_epochs))
            losses.append(logs["loss"])
            self.state.global_step = step + 1
            self.state.epoch = (step + 1) / batches_per_epoch
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log or step + 1 == max_steps:
                self.log(logs)
            if self.control.should_save:
                self._save_checkpoint(model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.control.should_training_stop:
                break
        self.store_flos()
        runtime = time.perf_counter() - start
        train_loss = sum(losses) / len(losses) if losses else 0.0
        metrics = {"train_runtime": runtime, "train_loss": train_loss, "total_flos": self.state.total_flos}
        self.log(metrics)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- held-out evaluation ------------------------------------------------------------------------------------

    def heldout(self, test_raw) -> dict[str, Any]:
        """Greedy replies to held-out prompts: mean reward, answer accuracy (with an `answer` column), KL to the
        reference and reply length. Runs on the main process; the others wait."""
        out: dict[str, Any] = {}
        if test_raw is not None and self.is_world_process_zero():
            if self.args.heldout_max_prompts:
                test_raw = test_raw.select(range(min(len(test_raw), self.args.heldout_max_prompts)))
            rows = list(test_raw)
            totals, texts, kls, lengths = [], [], [], []
            for i in range(0, len(rows), self.args.rollout_forward_batch_size):
                chunk = rows[i : i + self.args.rollout_forward_batch_size]
                query, query_mask = self.encode_prompts([r["prompt"] for r in chunk])
                response, mask, ended = self.generate(query, query_mask, greedy=True)
                logprobs, ref_logprobs, _ = self.forward_rollout(query, query_mask, response, mask)
                total, info = self.score(chunk, response, mask)
                totals.append(total)
                texts += info["texts"]
                kls.append((kl_penalty(logprobs, ref_logprobs) * mask).sum(1))
                lengths.append(mask.sum(1).float())
            out = {
                "heldout_reward": float(torch.cat(totals).nanmean()),
                "heldout_kl": float(torch.cat(kls).mean()),
                "heldout_response_length": float(torch.cat(lengths).mean()),
                "heldout_prompts": len(rows),
            }
            if "answer" in test_raw.column_names:
                from hfrecipes.evaluation import load_metric

                result = load_metric("answer_accuracy").compute(
                    predictions=texts, references=[str(r["answer"]) for r in rows]
                )
                out["heldout_accuracy"] = result.get("accuracy")
            out["examples"] = [
                {"prompt": str(r["prompt"]), "reply": t} for r, t in zip(rows[:3], texts[:3], strict=True)
            ]
        self.accelerator.wait_for_everyone()
        return out


def load_weights(model, folder: Path) -> None:
    """Weights saved by `save_pretrained` back into `model`: a LoRA adapter (and saved head), or full weights."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UsageError(
            f"checkpoint '{folder}' does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def run(script_args: ScriptArguments, training_args: PPOConfig, model_args: ModelConfig, recipe: dict):
    """Optimise the policy against the rewards with PPO and write the stage folder; returns (output_dir, record)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    output_dir = Path(training_args.output_dir)
    resume_from = record.check_output_dir(output_dir, STAGE)
    modeling.check_model_args(model_args, parent_stage="sft", lm_head_adapter=True)
    reward_funcs = check_reward_setup(training_args, model_args)
    parent = record.read_record(model_args.model_name_or_path)
    rec = record.new_record(STAGE, recipe, parent)

    # Data: prompts (and any columns the reward functions read); checked before any model exists.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, COLUMNS)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)

    # Tokenizer: the policy's; the reward model reads text through its own.
    tokenizer = modeling.load_stage_tokenizer(model_args)

    # Models: policy (+LoRA/QLoRA), reference, value model, reward model.
    record.start_run(output_dir, STAGE, training_args.process_index == 0)
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
        callbacks=[record.metrics_callback(output_dir), record.finite_loss_callback(output_dir)],
    )
    rec["model"] = record.model_summary(policy, model_args.model_name_or_path)
    rec["model"]["adapter"] = modeling.adapter_summary(policy, model_args)
    rec["model"]["reference"] = "separate copy of the parent" if reference is not None else "adapter-disabled policy"
    rec["model"]["value_model"] = value_source
    rec["model"]["reward"] = {"reward_model": training_args.reward_model_path, "functions": training_args.reward_funcs}
    before = trainer.heldout(test_raw)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    after = trainer.heldout(test_raw)

    # Save: policy (or adapter), tokenizer, record, card (main process only).
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        datasets = [record.dataset_entry(script_args.dataset_name, script_args.dataset_train_split, train_raw)]
        last = {k: (record.logged(trainer, k) or [None])[-1] for k in ("score", "kl", "clipfrac", "approxkl")}
        metrics = {
            "heldout_reward_before": before.get("heldout_reward"),
            "heldout_reward": after.get("heldout_reward"),
            "heldout_accuracy_before": before.get("heldout_accuracy"),
            "heldout_accuracy": after.get("heldout_accuracy"),
            "heldout_kl": after.get("heldout_kl"),
            "heldout_response_length": after.get("heldout_response_length"),
            "heldout_prompts": after.get("heldout_prompts"),
            "heldout_examples": after.get("examples"),
            "kl": last["kl"],
            "train_score_last_logged": last["score"],
            "train_score_first_logged": (record.logged(trainer, "score") or [None])[0],
            "clipfrac_last_logged": last["clipfrac"],
            "kl_coef_final": trainer.kl_coef,
            "rollout_batch_size": training_args.rollout_batch_size * training_args.world_size,
        }
        record.finish_record(rec, trainer, result, wall, datasets, stage_cutoff, metrics, script_args)
        record.close_run(output_dir, rec)
    trainer.accelerator.wait_for_everyone()
    return output_dir, record.read_record(output_dir)

"""PPO's arithmetic and trainer, for the stage in `stages/ppo.py` (its config and `run()`).

The arithmetic is pure functions on tensors, checked by hand in tests/test_ppo.py. `PPOTrainer.train()` is a loop over
named phases that pass typed bundles: `rollout` (sample replies; log-probabilities under policy and reference, values)
-> `score` (rewards, the missing-EOS penalty) -> `advantages` (per-token KL penalty, GAE, whitening) -> `update`
(epochs of clipped updates over minibatches) -> `log_step` (metrics over updates and processes) -> `end_step`
(adaptive KL, callbacks, logs, checkpoints) -> `gold_step` (the gold check of `hfrecipes/gold.py`, when on). The
Trainer internals the loop drives are in `trainer_internals.py`.

Deliberate simplifications: one rollout per step, sampled by the policy being trained (no separate generation
engine); the reward arrives on a reply's last token only; the KL penalty is the k1 estimate; the reference under LoRA
is the policy with its adapter off.

    hfrecipes ppo --config tiny/ppo
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers

from hfrecipes import engines, modeling, record
from hfrecipes.errors import UsageError
from hfrecipes.gold import BestCheckpoint
from hfrecipes.modeling import ModelConfig
from hfrecipes.report import card
from hfrecipes.stages import common, trainer_internals
from hfrecipes.stages.common import frozen_for_engine

VALUE_HEAD = "value_head.safetensors"
VALUE_MODEL = "value_model"
PPO_STATE = "ppo_state.json"


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


def ppo_losses(
    new_logprobs,
    old_logprobs,
    advantages,
    new_values,
    old_values,
    returns,
    mask,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
):
    """Clipped policy loss, clipped value loss and their statistics for one micro-batch."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    clipped_values = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
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
    return pg_loss + vf_coef * vf_loss, stats


def explained_variance(values, returns, mask) -> float:
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


# --------------------------------------------------------------------------------- what the phases pass on


class Rollout(NamedTuple):
    """One batch of sampled replies, B rows. Prompt tensors are (B, Q), left-padded; reply tensors are (B, R),
    right-padded, position t scoring reply token t."""

    query: torch.Tensor  # prompt ids
    query_mask: torch.Tensor  # 1 on prompt tokens
    response: torch.Tensor  # reply ids, padding after the first EOS
    response_mask: torch.Tensor  # 1 up to and including the first EOS (long)
    ended: torch.Tensor  # (B,) whether the reply reached EOS within max_new_tokens
    logprobs: torch.Tensor  # log-probabilities under the policy that sampled
    ref_logprobs: torch.Tensor  # ... under the frozen reference
    values: torch.Tensor  # the value model's estimate before each reply token


class Scores(NamedTuple):
    total: torch.Tensor  # (B,) weighted sum of the rewards, minus the missing-EOS penalty
    reward_means: dict[str, float]  # "reward/<name>": each reward's mean over the batch (before weights)


class Advantages(NamedTuple):
    kl: torch.Tensor  # (B, R) per-token KL to the reference, 0 past the reply
    non_score: torch.Tensor  # (B, R) the KL penalty, -kl_coef * kl
    advantages: torch.Tensor  # (B, R) GAE, whitened over the batch's reply tokens
    returns: torch.Tensor  # (B, R) value targets: GAE before whitening plus the values


def estimate_advantages(
    rollout: Rollout, scores: Scores, *, kl_coef: float, gamma: float, lam: float, whiten_rewards: bool
) -> Advantages:
    """Per-token rewards (the KL penalty on every token, the score added on each reply's last), then GAE advantages,
    whitened, and returns."""
    fmask = rollout.response_mask.float()
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs) * fmask
    non_score = -kl_coef * kl
    token_rewards = non_score.clone()
    last = rollout.response_mask.sum(1) - 1
    token_rewards[torch.arange(len(last)), last] += scores.total
    if whiten_rewards:
        token_rewards = whiten(token_rewards, fmask, shift_mean=False) * fmask
    advantages, returns = gae(token_rewards, rollout.values, fmask, gamma, lam)
    advantages = whiten(advantages, fmask) * fmask
    return Advantages(kl, non_score, advantages, returns)


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


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def load_value_model(args: transformers.TrainingArguments, model_args: ModelConfig, policy, tokenizer):
    """(critic or None, value head or None, where the value model started). `args` is the stage's `PPOConfig`."""
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


def load_policy(args: transformers.TrainingArguments, model_args: ModelConfig):
    """(policy, reference or None): under LoRA the reference is the policy with its adapter disabled."""
    policy = modeling.load_pretrained(model_args)
    lora = modeling.peft_config(model_args)
    if lora is None:
        with engines.every_process_loads():
            reference = modeling.load_pretrained(model_args).eval().requires_grad_(False)
        return policy, reference
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False):
        policy = prepare_model_for_kbit_training(policy, args.gradient_checkpointing)
    return get_peft_model(policy, lora), None


def submodule_state(state: dict | None, name: str) -> dict | None:
    """The entries of a gathered `PolicyAndValue` state dict under `name.`, without the prefix (None stays None)."""
    if state is None:
        return None
    return {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}


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


# ---------------------------------------------------------------------------------------------- the trainer


class PPOTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, transformers.Trainer):
    """PPO on `transformers.Trainer`: its accelerator, optimizer, scheduler, callbacks, logging and checkpoints;
    `train()` is the PPO loop. `args` is the stage's `PPOConfig` (`stages/ppo.py`): TrainingArguments plus PPO's
    fields."""

    def __init__(
        self,
        args: transformers.TrainingArguments,
        processing_class,
        policy,
        ref_model,
        critic,
        value_head,
        reward_scorer,
        reward_funcs: list,
        train_dataset,
        callbacks=None,
        gold=None,
    ):
        for m in (policy, ref_model, critic):
            if m is not None:
                disable_dropout(m)
        model = PolicyAndValue(policy, critic, value_head)
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, callbacks=callbacks
        )
        self.ref_model = frozen_for_engine(self.accelerator, ref_model) if ref_model is not None else None
        self.reward_scorer = reward_scorer
        if reward_scorer is not None:
            reward_scorer.model = frozen_for_engine(self.accelerator, reward_scorer.model)
        self.reward_funcs = reward_funcs
        names = (["reward_model"] if reward_scorer is not None else []) + [f.__name__ for f in reward_funcs]
        self.reward_names = names
        self.reward_weights = list(args.reward_weights or [1.0] * len(names))
        self.kl_coef = args.kl_coef
        self.gold = gold  # a `hfrecipes.gold.GoldCheck`, or None
        self.gold_best = BestCheckpoint(self)  # where gold_keep_best keeps the best check's weights
        self.gold_proxies: list[float] = []  # rollout scores since the last gold check
        self.eos_id = processing_class.eos_token_id
        self.pad_id = processing_class.pad_token_id if processing_class.pad_token_id is not None else self.eos_id
        # set by `begin()`: the policy's size (for FLOPs), tokens seen so far, rollout batches per pass over the data
        self.policy_params, self.num_tokens, self.batches_per_epoch = 0, 0, 0

    # -- models ---------------------------------------------------------------------------------------------

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model_wrapped)

    @property
    def zero3(self) -> bool:
        return common.zero3(self.accelerator)

    @contextlib.contextmanager
    def gathered(self):
        """The policy and value model with whole weights on every process, for a rollout. Under ZeRO-3 the
        partitions are gathered once and the engine's per-module fetch hooks lifted (as TRL's
        `unwrap_model_for_generation` does), instead of a gather of every layer at every sampled token; before
        training there is no engine yet and the weights zero.Init partitioned are gathered alone. Every process must
        enter it together."""
        if not self.zero3:
            yield self.unwrapped
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        engine = self.model_wrapped if self.model_wrapped is not self.model else None
        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            if engine is not None:
                remove_hooks(engine)
            try:
                yield self.unwrapped
            finally:
                if engine is not None:
                    add_hooks(engine)

    @contextlib.contextmanager
    def gathered_policy(self):
        """The policy alone, whole, to generate gold replies with."""
        with self.gathered() as model:
            yield model.policy

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
        # ZeRO-3 holds a partition on each process: every process takes part in gathering the whole weights
        # (`zero3_save_16bit_model: true` in the accelerate config), and the main process writes them
        full = self.accelerator.get_state_dict(self.model_wrapped) if self.zero3 else None
        if self.args.should_save:
            model.policy.save_pretrained(
                output_dir, state_dict=submodule_state(full, "policy"), safe_serialization=True
            )
            self.processing_class.save_pretrained(output_dir)
            record.drop_pickles(output_dir)
            if _internal_call:
                if model.critic is not None:
                    critic_state = submodule_state(full, "critic")
                    model.critic.save_pretrained(
                        output_dir / VALUE_MODEL, state_dict=critic_state, safe_serialization=True
                    )
                else:
                    head = submodule_state(full, "value_head") or model.value_head.state_dict()
                    save_file({k: v.contiguous() for k, v in head.items()}, output_dir / VALUE_HEAD)
                (output_dir / PPO_STATE).write_text(json.dumps({"kl_coef": self.kl_coef}) + "\n")
        self.accelerator.wait_for_everyone()

    def _load_best_model(self) -> None:
        """The checkpoint `state.best_model_checkpoint` back into the model in training (gold_keep_best), as Trainer's
        own does but for the policy and value model this trainer saves: under DeepSpeed Trainer's own (the engine's
        checkpoint holds both), otherwise this stage's checkpoint files."""
        if self.is_deepspeed_enabled:
            super()._load_best_model()
        else:
            self.load_checkpoint(self.state.best_model_checkpoint)

    def load_checkpoint(self, checkpoint: str) -> None:
        """Policy, value model and KL coefficient from a checkpoint of this stage (before `prepare`). Under DeepSpeed
        the weights come back with the engine's own checkpoint (`trainer_internals.begin_training`)."""
        from safetensors.torch import load_file

        ckpt = Path(checkpoint)
        if (ckpt / PPO_STATE).is_file():
            self.kl_coef = json.loads((ckpt / PPO_STATE).read_text())["kl_coef"]
        if self.is_deepspeed_enabled:
            return
        model = self.model
        load_weights(model.policy, ckpt)
        if model.critic is not None:
            load_weights(model.critic, ckpt / VALUE_MODEL)
        else:
            model.value_head.load_state_dict(load_file(ckpt / VALUE_HEAD))

    # -- sampling and scoring -------------------------------------------------------------------------------

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
        from hfrecipes.inference import left_padded, prompt_ids

        return left_padded(prompt_ids(self.processing_class, prompts), self.pad_id, self.accelerator.device)

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

    def weighted_rewards(self, rows: list[dict[str, Any]], response, response_mask) -> tuple[Any, dict[str, Any]]:
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

    # -- the PPO loop: its phases in order --------------------------------------------------------------------

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
        max_steps = self.num_steps()
        start_step = self.begin(max_steps, resume_from_checkpoint)
        losses = []
        start = time.perf_counter()
        if self.gold is not None:
            self.gold.check(start_step, self.gathered_policy, self.gold_best.keep, [])
        for step in range(start_step, max_steps):
            rows = self.step_prompts(step)
            trainer_internals.fire(self, "on_step_begin")
            rollout = self.rollout(rows)
            scores = self.score(rows, rollout)
            advantages = self.advantages(rollout, scores)
            update = self.update(rollout, advantages)
            logs = self.log_step(rollout, scores, advantages, update)
            losses.append(logs["loss"])
            stop = self.end_step(step, max_steps, logs)
            if self.gold_step(step + 1, logs) or stop:
                break
        if self.gold is not None:
            self.gold.finish(self.state.global_step, self.gathered_policy, self.gold_best, self.gold_proxies)
        train_loss = sum(losses) / len(losses) if losses else 0.0
        return trainer_internals.finish_training(self, train_loss, start)

    def begin(self, max_steps: int, resume_from_checkpoint: str | None) -> int:
        """Weights of a checkpoint to resume, optimizer, trainer state, counters; returns the first step."""
        args = self.args
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        updates = max_steps * args.num_ppo_epochs * args.num_mini_batches
        start_step = trainer_internals.begin_training(self, updates, max_steps, resume_from_checkpoint)
        self.policy_params = record.parameter_count(self.unwrapped.policy)
        self.num_tokens = self.state.log_history[-1].get("num_tokens", 0) if self.state.log_history else 0
        self.batches_per_epoch = len(self.prompt_batches(args.rollout_batch_size, 0))
        self.model_wrapped.train()
        return start_step

    def step_prompts(self, step: int) -> list[dict[str, Any]]:
        """This process's dataset rows for `step` (each epoch reshuffles)."""
        epoch, within = divmod(step, self.batches_per_epoch)
        return [self.train_dataset[i] for i in self.prompt_batches(self.args.rollout_batch_size, epoch)[within]]

    def rollout(self, rows: list[dict[str, Any]], greedy: bool = False) -> Rollout:
        """Replies to the rows' prompts, sampled (or greedy), with log-probabilities under policy and reference and
        the values, without gradients."""
        query, query_mask = self.encode_prompts([r["prompt"] for r in rows])
        with self.gathered():
            response, mask, ended = self.generate(query, query_mask, greedy=greedy)
            logprobs, ref_logprobs, values = self.forward_rollout(query, query_mask, response, mask)
        return Rollout(query, query_mask, response, mask, ended, logprobs, ref_logprobs, values)

    def score(self, rows: list[dict[str, Any]], rollout: Rollout) -> Scores:
        """The rewards of each reply, less the penalty for a reply that never ends."""
        total, info = self.weighted_rewards(rows, rollout.response, rollout.response_mask)
        if self.args.missing_eos_penalty is not None:
            total = total - self.args.missing_eos_penalty * (~rollout.ended).float()
        return Scores(total, {k: v for k, v in info.items() if k != "texts"})

    def advantages(self, rollout: Rollout, scores: Scores) -> Advantages:
        args = self.args
        return estimate_advantages(
            rollout, scores, kl_coef=self.kl_coef, gamma=args.gamma, lam=args.lam, whiten_rewards=args.whiten_rewards
        )

    def update(self, rollout: Rollout, adv: Advantages) -> dict[str, Any]:
        """PPO epochs over shuffled minibatches, one optimizer step each, gradient accumulation over micro-batches
        inside each. Returns the statistics averaged over every micro-batch, and those of the first minibatch, where
        the policy is still the one that sampled (ratio 1, nothing clipped)."""
        args, model = self.args, self.model_wrapped
        q = rollout.query.shape[1]
        input_ids = torch.cat([rollout.query, rollout.response], 1)
        attention = torch.cat([rollout.query_mask, rollout.response_mask], 1)
        fmask = rollout.response_mask.float()
        stats, first = [], {}
        for ppo_epoch in range(args.num_ppo_epochs):
            order = torch.randperm(len(input_ids), device=input_ids.device)
            for mb in range(args.num_mini_batches):
                mb_idx = order[mb * args.mini_batch_size : (mb + 1) * args.mini_batch_size]
                micro = mb_idx.split(args.per_device_train_batch_size)
                for k, idx in enumerate(micro):
                    with trainer_internals.micro_batch(self, model, last=k == len(micro) - 1):
                        logits, new_values = model(input_ids[idx], attention[idx])
                        new_logprobs = token_logprobs(logits[:, q - 1 : -1], rollout.response[idx], args.temperature)
                        loss, s = ppo_losses(
                            new_logprobs,
                            rollout.logprobs[idx],
                            adv.advantages[idx],
                            new_values[:, q - 1 : -1],
                            rollout.values[idx],
                            adv.returns[idx],
                            fmask[idx],
                            cliprange=args.cliprange,
                            cliprange_value=args.cliprange_value,
                            vf_coef=args.vf_coef,
                        )
                        # DeepSpeed divides by its own gradient_accumulation_steps (the micro-batch count)
                        self.accelerator.backward(loss if self.is_deepspeed_enabled else loss / len(micro))
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
        mean = lambda xs: torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]).mean()  # noqa: E731
        out = {k: mean([s[k] for s in stats]) for k in stats[0] if k != "max_ratio_dev"}
        out["first_minibatch/clipfrac"] = mean(first["clipfrac"])
        out["first_minibatch/max_ratio_dev"] = torch.stack(first["max_ratio_dev"]).max()
        return out

    def log_step(self, rollout: Rollout, scores: Scores, adv: Advantages, update: dict[str, Any]) -> dict[str, float]:
        """The step's metrics, averaged over its replies and updates, then over processes (the largest first-minibatch
        ratio deviation is the maximum); counts the step's tokens and FLOPs."""
        args = self.args
        mask = rollout.response_mask
        device = rollout.query.device
        seq_tokens = int(torch.cat([rollout.query_mask, mask], 1).sum())
        local = {
            "score": scores.total.mean(),
            "non_score_reward": adv.non_score.sum(1).mean(),
            "rlhf_reward": (adv.non_score.sum(1) + scores.total).mean(),
            "kl": adv.kl.sum(1).mean(),
            "response_length": mask.sum(1).float().mean(),
            "eos_fraction": rollout.ended.float().mean(),
            "explained_variance": torch.tensor(explained_variance(rollout.values, adv.returns, mask.float())),
            **{k: v for k, v in update.items() if k != "first_minibatch/max_ratio_dev"},
            **{k: torch.tensor(v) for k, v in scores.reward_means.items()},
        }
        keys = sorted(local)
        gathered = self.accelerator.gather(torch.stack([local[k].float().to(device) for k in keys])[None])
        logs = {k: float(v) for k, v in zip(keys, gathered.nanmean(0), strict=True)}
        dev = self.accelerator.gather(update["first_minibatch/max_ratio_dev"][None].float())
        logs["first_minibatch/max_ratio_dev"] = float(dev.max())
        tokens = int(self.accelerator.gather(torch.tensor([seq_tokens], device=device)).sum())
        self.num_tokens += tokens
        logs["num_tokens"] = self.num_tokens
        logs["kl_coef"] = self.kl_coef
        logs["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
        # generation (2N per token) + three forwards (policy, reference, value) + epochs of forward/backward
        trainer_internals.add_flos(self, float(self.policy_params * tokens * (2 + 6 + 6 * args.num_ppo_epochs)))
        return logs

    def end_step(self, step: int, max_steps: int, logs: dict[str, float]) -> bool:
        """Adaptive KL; the trainer state, callbacks, logs and checkpoints. Returns whether training stops."""
        args = self.args
        if args.adaptive_kl:
            n = args.rollout_batch_size * args.world_size
            self.kl_coef = adapt_kl_coef(self.kl_coef, logs["kl"], args.target_kl, args.kl_horizon, n)
        return trainer_internals.end_step(
            self, step + 1, (step + 1) / self.batches_per_epoch, logs, last=step + 1 == max_steps
        )

    def gold_step(self, step: int, logs: dict[str, float]) -> bool:
        """The gold check where `step` is due one, its proxy the mean score of the rollouts since the last; returns
        whether it stops training."""
        if self.gold is None:
            return False
        self.gold_proxies.append(logs["score"])
        if not self.gold.due(step):
            return False
        proxies, self.gold_proxies = self.gold_proxies, []
        return bool(self.gold.check(step, self.gathered_policy, self.gold_best.keep, proxies))

    # -- held-out evaluation ------------------------------------------------------------------------------------

    def heldout(self, test_raw) -> dict[str, Any]:
        """Greedy replies to held-out prompts: mean reward, answer accuracy (with an `answer` column), KL to the
        reference and reply length. Every process replies to the same prompts (under ZeRO-3 each forward gathers
        weights from all of them) and the main process returns the numbers."""
        out: dict[str, Any] = {}
        if test_raw is not None:
            if self.args.heldout_max_prompts:
                test_raw = test_raw.select(range(min(len(test_raw), self.args.heldout_max_prompts)))
            rows = list(test_raw)
            totals, texts, kls, lengths = [], [], [], []
            for i in range(0, len(rows), self.args.rollout_forward_batch_size):
                chunk = rows[i : i + self.args.rollout_forward_batch_size]
                replies = self.rollout(chunk, greedy=True)
                total, info = self.weighted_rewards(chunk, replies.response, replies.response_mask)
                totals.append(total)
                texts += info["texts"]
                kls.append((kl_penalty(replies.logprobs, replies.ref_logprobs) * replies.response_mask).sum(1))
                lengths.append(replies.response_mask.sum(1).float())
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
        return out if self.is_world_process_zero() else {}

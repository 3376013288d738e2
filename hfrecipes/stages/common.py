"""What the fine-tuning stages (sft, reward, dpo, kto, grpo, rloo, ppo, distill) change in TRL's configs and trainers,
in one place.

A stage config is `class SFTConfig(FineTuneDefaults, LogitsHeadOption, trl.SFTConfig)`: these fields come first in
the MRO, so they replace TRL's. The one trainer change is the LM head sft, dpo, kto, grpo and rloo score tokens with
(`use_logits_lm_head`), and dpo and kto load their frozen reference alike (`frozen_reference`); each stage's `run()`
stays in its own file (grpo and rloo share one: `outcome_rl.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from hfrecipes import engines, modeling


@dataclass
class DeviceDefaults:
    """Device defaults every stage config takes, pretraining included (`modeling.resolve_device_defaults` says what
    each resolves to and why). A stage config lists it first among its bases, so these fields replace the parent's.

    - `bf16=None`, `tf32=None`: "on where the device has it" (bf16 on a GPU that supports it, TF32 on Ampere and
      newer); a recipe's true or false is kept.
    - `logging_nan_inf_filter=False`: transformers' filter reads every step's loss on the host, a device
      synchronisation per step that stops the host queueing the next step while the GPU works; it also replaces a
      non-finite loss by the running mean, which would hide it from the stage's finite-loss stop
      (`record.finite_loss_callback`).
    - `gradient_checkpointing` (a recipe key on every supported transformers) is passed on under the newer name where
      transformers has it (`checkpointing_under_its_new_name`).
    """

    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. Default: on where a GPU supports bf16."}
    )
    tf32: bool | None = field(
        default=None, metadata={"help": "TF32 matmuls for fp32 work. Default: on for Ampere and newer GPUs."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace a non-finite loss in the logs by the mean (off: a non-finite loss stops the stage)."
        },
    )

    def __post_init__(self):
        modeling.resolve_device_defaults(self)
        checkpointing_under_its_new_name(self)
        super().__post_init__()


def checkpointing_under_its_new_name(args) -> None:
    """Move `gradient_checkpointing` (and its `_kwargs`) to `activation_checkpointing` where transformers has that
    name (5.24 and newer), which warns on the old one; older releases have only the old name.

    Recipes keep `gradient_checkpointing`, the name every transformers in pyproject's range reads, and our configs
    default it (FineTuneDefaults: False), so without this every fine-tuning stage would print transformers'
    deprecation warning. A value set under the new name wins, as it does in transformers."""
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if hasattr(args, new):
            if getattr(args, new) is None:
                setattr(args, new, getattr(args, old))
            setattr(args, old, None)  # transformers sets it back to the new name's value


@dataclass
class FineTuneDefaults(DeviceDefaults):
    """Defaults the fine-tuning stages change from TRL's, and why (device defaults: `DeviceDefaults`).

    - `gradient_checkpointing=False`: TRL turns it on; it slows small models 10-40%, so the real-model recipes set
      it where memory needs it.
    - `save_total_limit=2`: checkpoints of a long run add up.
    - `trust_remote_code` is not a key of the stage config: it is ModelConfig's (one switch for model and
      tokenizer, off by default), so a recipe cannot set it in two places with two meanings.
    """

    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})
    trust_remote_code: bool = field(default=False, init=False, metadata={"help": "Set in ModelConfig."})


@dataclass
class LogitsHeadOption:
    """The `logits_lm_head` switch of the stages whose TRL trainer scores tokens through its fused LM head (sft, dpo,
    kto, grpo, rloo).

    TRL patches the model so that `fused_lm_head=True` returns per-token log-probabilities computed in vocabulary
    tiles, recomputing every tile in the backward pass: that never holds the `(tokens, vocab)` logits, which a GPU
    needs for a 150k-token vocabulary. Where Triton does not run (a CPU), the tiles are folded by Python-level torch
    ops and the recomputation is pure cost; `bench/training_overhead.py` measures it. The switch puts a plain head in
    its place: one matmul over the scored positions, `log_softmax`, and the logged statistics from the same logits.
    """

    logits_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "Score tokens from the full logits of the trained positions instead of TRL's tiled fused LM head "
            "(faster without Triton; holds a tokens x vocab tensor). Default: on where Triton does not run (CPU)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.logits_lm_head is None:
            self.logits_lm_head = self.use_cpu or not modeling.has_triton_device()


def use_logits_lm_head(model, outputs: tuple[str, ...], temperature: float = 1.0, entropy_grad: bool = False) -> bool:
    """Replace the fused LM head TRL added to `model` by one computed from logits; returns whether it did.

    Same contract as `trl.trainer.utils.add_fused_lm_head`'s forward with `fused_lm_head=True`: per-token fields of
    `FusedCausalLMOutput` of the logits divided by `temperature`, zero where the label is -100, `loss` =
    -sum(log_probs) / (valid tokens or `num_items_in_batch`). `log_probs` carries a gradient, `entropy` too with
    `entropy_grad` (GRPO's entropy bonus); the other fields feed logs. Models whose logits TRL transforms
    (softcapping, a logit scale) or that need a router loss keep TRL's head.
    """
    import functools
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    if any(getattr(text_config, k, None) is not None for k in scaled):
        return False
    if getattr(text_config, "output_router_logits", False):
        return False
    fused_forward = model.forward  # TRL's: the model's own forward unless `fused_lm_head=True`

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return fused_forward(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        targets = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float() / temperature  # only the scored positions
        log_softmax = torch.log_softmax(logits, dim=-1)
        fields = {"log_probs": log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}
        if "entropy" in outputs:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                fields["entropy"] = -(log_softmax.exp() * log_softmax).sum(-1)
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                fields["log_sum_sq_probs"] = torch.logsumexp(2 * log_softmax, dim=-1)
            if "mean_logits" in outputs:
                fields["mean_logits"] = logits.mean(-1)
            if "is_top1" in outputs:
                fields["is_top1"] = logits.argmax(-1) == targets
        # `masked_scatter` keeps an all-masked batch connected to the graph, as TRL's head does
        fields = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in fields.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / count, label_mask=mask, **fields)

    model.forward = types.MethodType(forward, model)
    return True


def logits_lm_heads(trainer, outputs: tuple[str, ...], temperature: float = 1.0, entropy_grad: bool = False) -> None:
    """After a TRL trainer's `__init__`: give its policy (the PEFT base under LoRA) and its reference model, if any,
    the logits head when `args.logits_lm_head` is on. `outputs`: the fields the trainer reads from the policy;
    `temperature` and `entropy_grad` as the trainer gave them to TRL's head."""
    from peft import PeftModel

    if not trainer.args.logits_lm_head:
        return
    policy = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    use_logits_lm_head(policy, outputs, temperature, entropy_grad)
    if getattr(trainer, "ref_model", None) is not None:
        # under DeepSpeed TRL has already wrapped the reference in an inference engine: patch the model inside
        use_logits_lm_head(trainer.accelerator.unwrap_model(trainer.ref_model), ("log_probs",), temperature)


def frozen_reference(model_args, training_args):
    """The reference a preference stage (dpo, kto) trains against, and how its record names it: a second copy of the
    parent for full training; none under LoRA (TRL disables the adapter) or where the parent's log-probabilities
    are precomputed before training (TRL computes them with the policy before its first step)."""
    if model_args.use_peft:
        return None, "adapter-disabled policy"
    if training_args.precompute_ref_log_probs:
        return None, "parent log-probabilities precomputed before training"
    with engines.every_process_loads():
        return modeling.load_pretrained(model_args), "separate copy of the parent"


# ------------------------------------------------------------------------------------- sharded engines


def zero3(accelerator) -> bool:
    """Whether `accelerator` runs DeepSpeed ZeRO-3 (weights partitioned across processes)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def references_load_on_every_process(trainer_module):
    """While a TRL trainer builds itself, the frozen reference it loads on its own (`create_model_from_path` in its
    module: RLOO's and GRPO's, at `beta` > 0 without LoRA) is read in full on every process
    (`engines.every_process_loads`). Under FSDP with `fsdp_cpu_ram_efficient_loading` transformers would read it on
    the first process only, and TRL's `prepare_fsdp` shards it without broadcasting the weights, so the other
    processes' KL penalty would measure against uninitialised weights. Only that load is changed: the policy, loaded
    before, still gets its weights from accelerate's broadcast when it is prepared."""
    load = trainer_module.create_model_from_path

    def every_process(*args, **kwargs):
        with engines.every_process_loads():
            return load(*args, **kwargs)

    trainer_module.create_model_from_path = every_process
    try:
        yield
    finally:
        trainer_module.create_model_from_path = load


def frozen_for_engine(accelerator, model):
    """A model that is only evaluated (a reference, a reward model), placed for the engine. Under ZeRO-3
    `from_pretrained` already partitioned its weights (zero.Init), so it runs in an inference engine of its own, as TRL
    does for its references; otherwise every process holds it whole."""
    if zero3(accelerator):
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device)


@contextlib.contextmanager
def whole_weights(model, trainer=None):
    """`model` with its whole weights on this process, to generate held-out replies. Under ZeRO-3 every process
    must enter together: before training (no `trainer`) the weights zero.Init partitioned are gathered; after it, the
    engine's, through TRL's `unwrap_model_for_generation`. FSDP gathers each layer in its forward, but FSDP2 leaves
    the root module's weights (embeddings, final norm) gathered after a forward with no backward, expecting one; a
    later save's resharding hook then fails on that storage, so every FSDP2 module is resharded on the way out."""
    if engines.requested() != "zero3":
        whole = model if trainer is None else trainer.accelerator.unwrap_model(trainer.model)
        try:
            yield whole
        finally:
            _reshard(whole)
        return
    if trainer is None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield model
        return
    from trl.models import unwrap_model_for_generation

    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as unwrapped:
        yield unwrapped


def _reshard(model) -> None:
    """Free the gathered weights FSDP2 keeps after a forward (a no-op on other engines)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()

"""What the fine-tuning stages (sft, reward, dpo) change in TRL's configs, in one place.

A stage config is `class SFTConfig(FineTuneDefaults, trl.SFTConfig)`: these fields come first in the MRO, so they
replace TRL's. Nothing here trains; each stage's `run()` stays in its own file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hfrecipes import modeling


@dataclass
class FineTuneDefaults:
    """Defaults changed from TRL's, and why.

    - `gradient_checkpointing=False`: TRL turns it on; it slows small models 10-40%, so the real-model recipes set
      it where memory needs it.
    - `bf16=None` means "on where a CUDA GPU supports it": TRL's default (on) fails on a CPU-only machine.
    - `save_total_limit=2`: checkpoints of a long run add up.
    - `trust_remote_code` is not a key of the stage config: it is ModelConfig's (one switch for model and
      tokenizer, off by default), so a recipe cannot set it in two places with two meanings.
    """

    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. Default: on where a CUDA GPU supports bf16."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})
    trust_remote_code: bool = field(default=False, init=False, metadata={"help": "Set in ModelConfig."})

    def __post_init__(self):
        modeling.apply_device_defaults(self)
        if self.bf16 is None and not self.fp16:
            self.bf16 = modeling.default_bf16()
        super().__post_init__()

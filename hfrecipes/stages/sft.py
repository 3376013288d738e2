"""Supervised fine-tuning on conversations (`messages`) or prompt/completion pairs, loss on the reply's tokens.

hfrecipes sft --config tiny/sft
hfrecipes sft --config tiny/sft_lora --max_steps 50
accelerate launch -m hfrecipes sft --config qwen2.5-0.5b-instruct/sft/lora
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trl

from hfrecipes import card, data, modeling
from hfrecipes.data import ScriptArguments
from hfrecipes.errors import UsageError
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.stagerun import StageRun
from hfrecipes.stages.common import FineTuneDefaults, LogitsHeadOption, logits_lm_heads

STAGE = "sft"
COLUMNS = data.STAGE_COLUMNS[STAGE]


@dataclass
class SFTConfig(FineTuneDefaults, LogitsHeadOption, trl.SFTConfig):
    """`trl.SFTConfig` with the fine-tuning defaults and the `logits_lm_head` switch of `stages/common.py`.

    Changed default: `assistant_only_loss=None` means "on for `messages` data"; prompt/completion data trains on
    the completion through TRL's `completion_only_loss`.
    """

    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Loss on the assistant's tokens only (needs `{% generation %}` markers in the chat template, or "
            "a template TRL can patch). Default: on for conversational `messages` data."
        },
    )


DATACLASSES = (ScriptArguments, SFTConfig, ModelConfig)


class SFTTrainer(card.OwnsCard, trl.SFTTrainer):
    """`trl.SFTTrainer` that owns the model card (ours is written from the stage record) and, where
    `logits_lm_head` is on, scores tokens from plain logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        logits_lm_heads(self, ("log_probs", "entropy", "is_top1"))  # the fields TRL's SFT loss and logs read


def resolve_loss(training_args: SFTConfig, train_raw) -> bool:
    """Settle assistant_only_loss from the data (on for `messages`); returns whether the data is conversational."""
    conversational = "messages" in train_raw.column_names or trl.is_conversational(train_raw[0])
    if training_args.assistant_only_loss is None:
        training_args.assistant_only_loss = "messages" in train_raw.column_names
    if training_args.assistant_only_loss and not conversational:
        raise UsageError(
            "assistant_only_loss: true needs conversational data (`messages`, or prompt/completion as message "
            "lists); this data is plain prompt/completion text, which trains on the completion only by itself "
            "(completion_only_loss). Set assistant_only_loss: false."
        )
    return conversational


def check_chat_template(tokenizer, training_args: SFTConfig, conversational: bool, name: str) -> None:
    """Conversational data needs a chat template, and assistant-only loss one that can mark the assistant's turns."""
    from trl.chat_template_utils import get_training_chat_template

    if not conversational or training_args.chat_template_path is not None:
        return
    if not tokenizer.chat_template:
        raise UsageError(
            f"the tokenizer of '{name}' has no chat template, and the data is conversational. Set "
            "chat_template_path to a .jinja file or to a tokenizer whose template to use."
        )
    if training_args.assistant_only_loss:
        try:
            get_training_chat_template(tokenizer)
        except ValueError:
            raise UsageError(
                f"assistant_only_loss needs `{{% generation %}}` markers in the chat template of '{name}', and TRL "
                "cannot patch this one. Set assistant_only_loss: false (loss on the whole conversation), or "
                "chat_template_path to a template with the markers."
            ) from None


def run(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig, recipe: dict):
    """Fine-tune and write the stage folder; returns (output_dir, record)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    modeling.check_model_args(model_args, parent_stage="pretrain")
    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)

    # Data: load and check before any model exists.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, COLUMNS)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)
    conversational = resolve_loss(training_args, train_raw)

    # Tokenizer: the checkpoint's, with a chat template that fits the data and the loss.
    tokenizer = modeling.load_stage_tokenizer(model_args)
    check_chat_template(tokenizer, training_args, conversational, model_args.model_name_or_path)
    data.check_chat_data(train_raw, tokenizer, script_args.dataset_name, training_args.chat_template_path)

    # Model: full weights, LoRA on top, or LoRA on a 4-bit base (QLoRA); all from the recipe's switches.
    run.start(training_args.process_index == 0)
    model = modeling.load_pretrained(model_args)

    # Trainer.
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_raw,
        eval_dataset=test_raw,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(model_args),
        callbacks=run.callbacks(),
    )
    run.describe_model(trainer.model, model_args.model_name_or_path, model_args)
    result = run.train(trainer)
    heldout = trainer.evaluate() if test_raw is not None else {}

    # Save: model (or adapter), tokenizer; record and card on the main process.
    trainer.save_model(str(training_args.output_dir))
    return run.finish(
        trainer,
        result,
        script_args,
        train_raw,
        cutoff=stage_cutoff,
        heldout=Heldout(
            "eval_loss",
            after=heldout.get("eval_loss"),
            examples=len(test_raw) if test_raw is not None else 0,
            higher_is_better=False,
            detail={"eval_mean_token_accuracy": heldout.get("eval_mean_token_accuracy")},
        )
        if test_raw is not None
        else None,
        metrics={
            "assistant_only_loss": training_args.assistant_only_loss,
            "completion_only_loss": trainer.completion_only_loss,
            "packing": training_args.packing,
        },
    )

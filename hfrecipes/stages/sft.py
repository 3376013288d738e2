"""Supervised fine-tuning on conversations (`messages`) or prompt/completion pairs, loss on the reply's tokens.

hfrecipes sft --config tiny/sft
hfrecipes sft --config tiny/sft_lora --max_steps 50
accelerate launch -m hfrecipes sft --config qwen2.5-0.5b-instruct/sft/lora
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trl

from hfrecipes import chat_templates, data, gold, modeling
from hfrecipes.data import ScriptArguments
from hfrecipes.errors import UsageError
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.report import card
from hfrecipes.stagerun import StageRun
from hfrecipes.stages import StageFacts, trainer_internals
from hfrecipes.stages.common import FineTuneDefaults, LogitsHeadOption, logits_lm_heads, whole_weights

STAGE = "sft"
FACTS = StageFacts(columns=(("messages",), ("prompt", "completion")))


@dataclass
class SFTConfig(FineTuneDefaults, LogitsHeadOption, gold.GoldOptions, trl.SFTConfig):
    """`trl.SFTConfig` with the fine-tuning defaults and the `logits_lm_head` switch of `stages/common.py`, and the
    gold check of `hfrecipes/gold.py` (train to the plateau: `gold_patience`).

    Changed default: `assistant_only_loss=None` means "on for `messages` data"; prompt/completion data trains on
    the completion through TRL's `completion_only_loss`.
    """

    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Loss on the assistant's tokens only (needs `{% generation %}` markers in the chat template, a "
            "ChatML or Llama 3 template hfrecipes can mark, or one TRL can patch). Default: on for conversational "
            "`messages` data."
        },
    )


DATACLASSES = (ScriptArguments, SFTConfig, ModelConfig)


class SFTTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, trl.SFTTrainer):
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


def check_chat_template(
    tokenizer, training_args: SFTConfig, conversational: bool, name: str, train_raw
) -> tuple[str | None, str | None]:
    """Conversational data needs a chat template, and assistant-only loss one whose `{% generation %}` markers put
    the replies in the loss. Returns the template to tokenize the training data with (None: the tokenizer's as it
    is) and its source for the record: "own", "trl", the family it was derived for, or "chat_template_path"."""
    if not conversational:
        return None, None
    if training_args.chat_template_path is not None:  # TRL reads it, and patches it where it lacks the markers
        return None, "chat_template_path" if training_args.assistant_only_loss else None
    if not tokenizer.chat_template:
        raise UsageError(
            f"the tokenizer of '{name}'{modeling.converted_from(name)} has no chat template, and the data is "
            "conversational. Set chat_template_path to a .jinja file or to a tokenizer whose template to use."
        )
    if not training_args.assistant_only_loss:
        return None, None
    return chat_templates.training_template(tokenizer, sample_conversations(train_raw, name), name)


def sample_conversations(ds, name: str, first: int = 16) -> list[list[dict]]:
    """The conversations a marked template is checked on: the first rows, the first row of each role, and the first
    row whose messages carry a field besides role and content (tool calls, reasoning), which templates render."""
    rows = set(range(min(len(ds), first)))
    for col in ("messages", "prompt", "completion"):
        if col in ds.column_names:
            rows.update(data.conversation_roles(ds, col, name).values())
            rows.update(_rows_with_message_fields(ds, col))
    conversations = []
    for i in sorted(rows):
        row = ds[i]
        if isinstance(row.get("messages"), list):
            conversations.append(row["messages"])
        elif isinstance(row.get("prompt"), list):
            conversations += [row["prompt"], row["prompt"] + (row.get("completion") or [])]
    return conversations


def _rows_with_message_fields(ds, col: str) -> list[int]:
    """For each message field besides role and content, the first row where a message sets it (found in Arrow)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ds.with_format("arrow")[col]
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or not pa.types.is_struct(
        arr.type.value_type
    ):
        return []
    messages, parents = pc.list_flatten(arr), pc.list_parent_indices(arr)
    hits = [
        pc.index(values.is_valid(), True).as_py()
        for key, values in zip(messages.type, messages.flatten(), strict=True)
        if key.name not in ("role", "content")
    ]
    return [parents[hit].as_py() for hit in hits if hit >= 0]


def run(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig, recipe: dict):
    """Fine-tune and write the stage folder; returns (output_dir, record)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    modeling.check_model_args(model_args, parent_stage="pretrain")
    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)

    # Data: load and check before any model exists.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, FACTS.columns)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)
    conversational = resolve_loss(training_args, train_raw)
    gold_set = gold.load(script_args, training_args, STAGE)

    # Tokenizer: the checkpoint's, with a chat template that fits the data and the loss.
    tokenizer = modeling.load_stage_tokenizer(model_args)
    data.check_chat_data(train_raw, tokenizer, script_args.dataset_name, training_args.chat_template_path)
    loss_template, loss_template_source = check_chat_template(
        tokenizer, training_args, conversational, model_args.model_name_or_path, train_raw
    )

    # Model: full weights, LoRA on top, or LoRA on a 4-bit base (QLoRA); all from the recipe's switches.
    run.start(training_args.process_index == 0)
    model = modeling.load_pretrained(model_args)

    # Trainer: it tokenizes the data with the marked template (TRL takes markers as they are), and the tokenizer gets
    # the model's own back, so checkpoints and the saved tokenizer (what vLLM and users render with) carry that one.
    own_template = tokenizer.chat_template
    tokenizer.chat_template = loss_template or own_template
    try:
        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_raw,
            eval_dataset=test_raw,
            processing_class=tokenizer,
            peft_config=modeling.peft_config(model_args),
            callbacks=run.callbacks(),
        )
    finally:
        tokenizer.chat_template = own_template
    gold_check = gold.attach(
        trainer, gold_set, training_args, tokenizer, None, lambda: whole_weights(trainer.model, trainer)
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
            "loss_template": loss_template_source,
            "completion_only_loss": trainer.completion_only_loss,
            "packing": training_args.packing,
            **gold.metrics(gold_check),
        },
    )

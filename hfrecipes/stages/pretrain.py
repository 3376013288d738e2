"""Pretraining from random weights (or continued pretraining) on raw text: packed blocks, loss on every position.

hfrecipes pretrain --config tiny/pretrain
accelerate launch -m hfrecipes pretrain --config tiny/pretrain --max_steps 50
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from transformers import Trainer, TrainingArguments

from hfrecipes import data, modeling, probe
from hfrecipes.data import ScriptArguments
from hfrecipes.errors import UsageError
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.report import card
from hfrecipes.stagerun import StageRun
from hfrecipes.stages import StageFacts, trainer_internals
from hfrecipes.stages.common import DeviceDefaults, whole_weights

STAGE = "pretrain"
FACTS = StageFacts(columns=(("text",),), tokens="blocks")


@dataclass
class PretrainConfig(DeviceDefaults, TrainingArguments):
    """`transformers.TrainingArguments` plus what pretraining needs.

    Changed defaults: the device's (`DeviceDefaults`: bf16 and TF32 where the GPU has them, CPU training on a
    machine without an accelerator), `logging_steps=10` (tiny runs need a visible curve), `save_total_limit=2`
    (checkpoints of a long run add up), `lr_scheduler_type="cosine"` (the usual choice for pretraining),
    `ddp_find_unused_parameters=False` (a dense LM uses every parameter).
    """

    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the raw text."})
    model_init_config: str = field(
        default="tiny",
        metadata={
            "help": "Architecture to initialise randomly: `tiny` (embedded) or a config folder or Hub id. "
            "Ignored when model_name_or_path is set (continued pretraining)."
        },
    )
    model_init_overrides: dict | str | None = field(
        default=None, metadata={"help": "Config fields to change, e.g. {num_hidden_layers: 2}."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; default: model_name_or_path's, or train one."}
    )
    train_tokenizer: bool = field(
        default=False, metadata={"help": "Train a byte-level BPE tokenizer on the training text first."}
    )
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary size of a trained tokenizer."})
    knowledge_probe: str | None = field(
        default=None,
        metadata={
            "help": "Dated facts to probe the trained model with (`tiny:facts`, or a dataset of prompt, answer, "
            "choices, date): how many it knows dated on or before the knowledge cutoff and after it."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every parameter is used in every step: skip DDP's extra graph walk."}
    )

    def __post_init__(self):
        import json

        if isinstance(self.model_init_overrides, str):
            self.model_init_overrides = json.loads(self.model_init_overrides)
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {self.block_size}")
        super().__post_init__()


DATACLASSES = (ScriptArguments, PretrainConfig, ModelConfig)


class PretrainTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, Trainer):
    """`transformers.Trainer` that owns the model card (ours is written from the stage record, not Trainer's)."""


def pack(dataset, tokenizer, text_field: str, block_size: int):
    """Tokenize, append EOS to each document, concatenate, cut into `block_size` blocks (the tail is dropped)."""

    def tokenize(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [tokenizer.eos_token_id] for x in ids]}

    def group(batch):
        flat = list(chain.from_iterable(batch["input_ids"]))
        n = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [b[:] for b in blocks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")
    return tokenized.map(group, batched=True, batch_size=1000, desc=f"pack into {block_size}-token blocks")


def run(script_args: ScriptArguments, training_args: PretrainConfig, model_args: ModelConfig, recipe: dict):
    """Pretrain and write the stage folder; returns (output_dir, record)."""
    from transformers import default_data_collator

    # Records: refuse a folder we must not touch; find a checkpoint to resume. Nothing is written yet.
    output_dir = Path(training_args.output_dir)
    run = StageRun(STAGE, output_dir, recipe, parent_dir=model_args.model_name_or_path)
    if model_args.model_name_or_path is None and not (
        training_args.train_tokenizer or training_args.tokenizer_name_or_path
    ):
        raise UsageError(
            "pretraining from scratch needs a tokenizer: set train_tokenizer: true or tokenizer_name_or_path."
        )
    if model_args.model_name_or_path:
        modeling.check_model_path(model_args.model_name_or_path)
    if training_args.tokenizer_name_or_path:
        modeling.check_model_path(training_args.tokenizer_name_or_path, "tokenizer_name_or_path")

    # Data: load and check before any model exists.
    if script_args.dataset_columns is None and training_args.dataset_text_field != "text":
        script_args.dataset_columns = {"text": training_args.dataset_text_field}
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, FACTS.columns)
    train_raw, test_raw, dropped = data.apply_max_date(script_args, train_raw, test_raw)  # the data stops there
    stage_cutoff = data.knowledge_cutoff(
        [train_raw],
        script_args.dataset_date_column,
        script_args.knowledge_cutoff,
        max_date=script_args.dataset_max_date,
        dropped=dropped,
    )
    facts = (
        probe.load_facts(training_args.knowledge_probe, script_args.tiny_seed)
        if training_args.knowledge_probe
        else None
    )
    if facts is not None and stage_cutoff["date"] is None:
        raise UsageError(
            f"knowledge_probe counts facts on either side of the knowledge cutoff, but this data has none "
            f"({stage_cutoff['detail']}). Set dataset_date_column or knowledge_cutoff, or knowledge_probe: null."
        )

    # Tokenizer: trained on the main process and saved into the stage folder, loaded by the others.
    run.start(training_args.process_index == 0)
    with training_args.main_process_first(desc="tokenizer"):
        if (output_dir / "tokenizer_config.json").is_file():
            tokenizer = modeling.load_tokenizer(str(output_dir))
        elif training_args.train_tokenizer:
            tokenizer = modeling.train_tiny_tokenizer(
                train_raw["text"], training_args.tokenizer_vocab_size, training_args.block_size * 4
            )
            if training_args.process_index == 0:
                tokenizer.save_pretrained(output_dir)
        else:
            source = training_args.tokenizer_name_or_path or model_args.model_name_or_path
            tokenizer = modeling.load_tokenizer(source, model_args.trust_remote_code)
    with training_args.main_process_first(desc="pack"):
        train_ds = pack(train_raw, tokenizer, "text", training_args.block_size)
        eval_ds = pack(test_raw, tokenizer, "text", training_args.block_size) if test_raw is not None else None
    if len(train_ds) == 0:
        raise UsageError(
            f"the training text is shorter than one block of block_size={training_args.block_size} "
            "tokens. Lower block_size or add data."
        )

    # Model: random weights from a config, or a checkpoint to continue from.
    if model_args.model_name_or_path:
        model = modeling.load_causal_lm(model_args)
        modeling.check_vocab(tokenizer, model.get_input_embeddings().num_embeddings, model_args.model_name_or_path)
        source = model_args.model_name_or_path
    else:
        config = modeling.config_from(
            training_args.model_init_config,
            training_args.model_init_overrides,
            tokenizer,
            model_args.trust_remote_code,
        )
        model = modeling.init_model(config, training_args.seed, model_args.attn_implementation)
        source = f"random init from '{training_args.model_init_config}'"
    run.describe_model(model, source)

    # Trainer.
    trainer = PretrainTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=run.callbacks(),
    )
    result = run.train(trainer)
    eval_metrics = trainer.evaluate() if eval_ds is not None and len(eval_ds) > 0 else {}
    if facts is not None:  # every process scores (a sharded model needs them all); the main one records it
        with whole_weights(trainer.model, trainer) as whole:
            found = probe.probe(whole, tokenizer, facts, stage_cutoff["date"])
        stage_cutoff["knowledge_probe"] = {"dataset": training_args.knowledge_probe, **found}

    # Save: model, tokenizer; record and card on the main process.
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
    examples = trainer.state.global_step * training_args.per_device_train_batch_size
    examples *= training_args.gradient_accumulation_steps * training_args.world_size
    eval_loss = eval_metrics.get("eval_loss")
    return run.finish(
        trainer,
        result,
        script_args,
        train_raw,
        datasets=[
            {
                "name": script_args.dataset_name,
                "split": script_args.dataset_train_split,
                "fingerprint": data.fingerprint(train_raw),
                "documents": len(train_raw),
                "blocks": len(train_ds),
            }
        ],
        cutoff=stage_cutoff,
        heldout=Heldout(
            "eval_loss",
            after=eval_loss,
            examples=len(eval_ds),
            higher_is_better=False,
            detail={"eval_perplexity": math.exp(min(eval_loss, 50)) if eval_loss is not None else None},
        )
        if eval_ds is not None
        else None,
        tokens=examples * training_args.block_size,
        examples=examples,
    )

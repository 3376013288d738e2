"""Reward model: a one-output classification head on a causal-LM checkpoint, trained on chosen/rejected pairs.

The pairs carry an explicit `prompt` or share it implicitly (the common start of `chosen` and `rejected`). The
held-out pair accuracy (how often the chosen reply scores higher) is measured before and after training.

hfrecipes reward --config tiny/reward
hfrecipes reward --config tiny/reward_lora --max_steps 50
accelerate launch -m hfrecipes reward --config qwen2.5-0.5b-instruct/reward/lora
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import trl

from hfrecipes import card, data, modeling, record
from hfrecipes.data import ScriptArguments
from hfrecipes.modeling import ModelConfig
from hfrecipes.stages.common import FineTuneDefaults

STAGE = "reward"
COLUMNS = data.STAGE_COLUMNS[STAGE]


@dataclass
class RewardConfig(FineTuneDefaults, trl.RewardConfig):
    """`trl.RewardConfig` with the fine-tuning defaults of `stages/common.py`."""


DATACLASSES = (ScriptArguments, RewardConfig, ModelConfig)


class RewardTrainer(card.OwnsCard, trl.RewardTrainer):
    """`trl.RewardTrainer` that owns the model card (ours is written from the stage record)."""


def run(script_args: ScriptArguments, training_args: RewardConfig, model_args: ModelConfig, recipe: dict):
    """Train the reward model and write the stage folder; returns (output_dir, record)."""
    from transformers import set_seed

    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    output_dir = Path(training_args.output_dir)
    resume_from = record.check_output_dir(output_dir, STAGE)
    modeling.check_model_args(model_args, parent_stage="sft")
    parent = record.read_record(model_args.model_name_or_path)
    rec = record.new_record(STAGE, recipe, parent)

    # Data: load and check before any model exists.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, COLUMNS)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)

    # Tokenizer: the checkpoint's; the score is read at the last token that is not padding.
    tokenizer = modeling.load_stage_tokenizer(model_args)

    # Model: the checkpoint's body under a new one-output head (seeded); LoRA trains adapters and the head.
    record.start_run(output_dir, STAGE, training_args.process_index == 0)
    set_seed(training_args.seed)
    model = modeling.load_pretrained(model_args, head="reward", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    # Trainer.
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_raw,
        eval_dataset=test_raw,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(model_args, task_type="SEQ_CLS"),
        callbacks=[record.metrics_callback(output_dir), record.finite_loss_callback(output_dir)],
    )
    rec["model"] = record.model_summary(trainer.model, model_args.model_name_or_path)
    rec["model"]["adapter"] = modeling.adapter_summary(trainer.model, model_args)
    before = trainer.evaluate() if test_raw is not None else {}
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    after = trainer.evaluate() if test_raw is not None else {}

    # Save: model (or adapter and head), tokenizer, record, card (main process only).
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        datasets = [record.dataset_entry(script_args.dataset_name, script_args.dataset_train_split, train_raw)]
        metrics = {
            "heldout_pair_accuracy_before": before.get("eval_accuracy"),
            "heldout_pair_accuracy": after.get("eval_accuracy"),
            "heldout_margin": after.get("eval_margin"),
            "heldout_pairs": len(test_raw) if test_raw is not None else 0,
            "train_accuracy_last_logged": (record.logged(trainer, "accuracy") or [None])[-1],
        }
        record.finish_record(rec, trainer, result, wall, datasets, stage_cutoff, metrics, script_args)
        record.close_run(output_dir, rec)
    trainer.accelerator.wait_for_everyone()
    return output_dir, record.read_record(output_dir)

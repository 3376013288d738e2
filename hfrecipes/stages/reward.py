"""Reward model: a one-output classification head on a causal-LM checkpoint, trained on chosen/rejected pairs.

The pairs carry an explicit `prompt` or share it implicitly (the common start of `chosen` and `rejected`). The
held-out pair accuracy (how often the chosen reply scores higher) is measured before and after training.

hfrecipes reward --config tiny/reward
hfrecipes reward --config tiny/reward_lora --max_steps 50
accelerate launch -m hfrecipes reward --config qwen2.5-0.5b-instruct/reward/lora
"""

from __future__ import annotations

from dataclasses import dataclass

import trl

from hfrecipes import data, modeling, record
from hfrecipes.data import ScriptArguments
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.report import card
from hfrecipes.stagerun import StageRun
from hfrecipes.stages import StageFacts, trainer_internals
from hfrecipes.stages.common import FineTuneDefaults

STAGE = "reward"
# A reward model is no causal LM: the lifecycle neither scores nor exports it.
FACTS = StageFacts(
    columns=(("prompt", "chosen", "rejected"), ("chosen", "rejected")), head="reward", scored=False, tokens="pairs"
)


@dataclass
class RewardConfig(FineTuneDefaults, trl.RewardConfig):
    """`trl.RewardConfig` with the fine-tuning defaults of `stages/common.py`."""


DATACLASSES = (ScriptArguments, RewardConfig, ModelConfig)


class RewardTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, trl.RewardTrainer):
    """`trl.RewardTrainer` that owns the model card (ours is written from the stage record)."""


def run(script_args: ScriptArguments, training_args: RewardConfig, model_args: ModelConfig, recipe: dict):
    """Train the reward model and write the stage folder; returns (output_dir, record)."""
    from transformers import set_seed

    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    modeling.check_model_args(model_args, parent_stage="sft")
    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)

    # Data: load and check before any model exists.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, FACTS.columns)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)

    # Tokenizer: the checkpoint's; the score is read at the last token that is not padding.
    tokenizer = modeling.load_stage_tokenizer(model_args)

    # Model: the checkpoint's body under a new one-output head (seeded); LoRA trains adapters and the head.
    run.start(training_args.process_index == 0)
    set_seed(training_args.seed)
    model = modeling.load_pretrained(model_args, head=FACTS.head, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    # Trainer.
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_raw,
        eval_dataset=test_raw,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(model_args, task_type="SEQ_CLS"),
        callbacks=run.callbacks(),
    )
    run.describe_model(trainer.model, model_args.model_name_or_path, model_args)
    before = trainer.evaluate() if test_raw is not None else {}
    result = run.train(trainer)
    after = trainer.evaluate() if test_raw is not None else {}

    # Save: model (or adapter and head), tokenizer; record and card on the main process.
    trainer.save_model(str(training_args.output_dir))
    return run.finish(
        trainer,
        result,
        script_args,
        train_raw,
        cutoff=stage_cutoff,
        heldout=Heldout(
            "pair_accuracy",
            after=after.get("eval_accuracy"),
            before=before.get("eval_accuracy"),
            examples=len(test_raw),
            detail={"margin": after.get("eval_margin"), "margin_before": before.get("eval_margin")},
        )
        if test_raw is not None
        else None,
        metrics={"train_accuracy_last_logged": (record.logged(trainer, "accuracy") or [None])[-1]},
    )

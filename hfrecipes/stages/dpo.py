"""Direct preference optimisation: the policy learns from chosen/rejected pairs against a frozen reference.

The reference is the parent checkpoint: a second copy for full training, the same model with its adapter disabled
under LoRA (no second copy). Any loss type TRL offers is a recipe key (`loss_type: [sigmoid, sft]`); held-out
reward margins, accuracies and log-probabilities are measured before and after training.

hfrecipes dpo --config tiny/dpo
hfrecipes dpo --config tiny/dpo_lora --max_steps 50
accelerate launch -m hfrecipes dpo --config qwen2.5-0.5b-instruct/dpo/lora
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import trl

from hfrecipes import data, modeling, record
from hfrecipes.data import ScriptArguments
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.report import card
from hfrecipes.stagerun import StageRun
from hfrecipes.stages import StageFacts, trainer_internals
from hfrecipes.stages.common import FineTuneDefaults, LogitsHeadOption, frozen_reference, logits_lm_heads

STAGE = "dpo"
FACTS = StageFacts(columns=(("prompt", "chosen", "rejected"), ("chosen", "rejected")), tokens="pairs")
# TRL validates loss types only inside the first training step; its config's help text lists them all, so the
# recipe is checked against that list before anything loads and follows TRL when it adds one.
LOSS_TYPES = tuple(re.findall(r"`'(\w+)'`", trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
HELDOUT_KEYS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen")


@dataclass
class DPOConfig(FineTuneDefaults, LogitsHeadOption, trl.DPOConfig):
    """`trl.DPOConfig` with the fine-tuning defaults and the `logits_lm_head` switch of `stages/common.py`;
    `loss_type` checked when parsed."""

    def __post_init__(self):
        super().__post_init__()
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type {unknown} is not a DPO loss of TRL; the loss types are {list(LOSS_TYPES)}")


DATACLASSES = (ScriptArguments, DPOConfig, ModelConfig)


class DPOTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, trl.DPOTrainer):
    """`trl.DPOTrainer` that owns the model card (ours is written from the stage record) and, where
    `logits_lm_head` is on, scores tokens from plain logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the fields TRL's DPO loss and logs read (WPO weights read `log_sum_sq_probs`)
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        logits_lm_heads(self, outputs + (("log_sum_sq_probs",) if self.use_weighting else ()))


def heldout(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The held-out preference numbers of one evaluation, plus the log-probability gap chosen - rejected."""
    out = {k: metrics[f"{prefix}_{k}"] for k in (*HELDOUT_KEYS, "logps/rejected") if f"{prefix}_{k}" in metrics}
    if "logps/chosen" in out and "logps/rejected" in out:
        out["logps/gap"] = out["logps/chosen"] - out["logps/rejected"]
    return out


def run(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelConfig, recipe: dict):
    """Optimise the policy on preference pairs and write the stage folder; returns (output_dir, record)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    modeling.check_model_args(model_args, parent_stage="sft")
    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)

    # Data: load and check before any model exists.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, FACTS.columns)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)

    # Tokenizer: the checkpoint's.
    tokenizer = modeling.load_stage_tokenizer(model_args)

    # Model: the policy, and the reference: a second copy only for full training without precomputed reference
    # log-probabilities; under LoRA the reference is the policy with its adapter disabled.
    run.start(training_args.process_index == 0)
    model = modeling.load_pretrained(model_args)
    ref_model, reference = frozen_reference(model_args, training_args)

    # Trainer.
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_raw,
        eval_dataset=test_raw,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(model_args),
        callbacks=run.callbacks(),
    )
    run.describe_model(trainer.model, model_args.model_name_or_path, model_args, reference=reference)
    before = trainer.evaluate() if test_raw is not None else {}
    result = run.train(trainer)
    after = trainer.evaluate() if test_raw is not None else {}

    # Save: model (or adapter), tokenizer; record and card on the main process.
    trainer.save_model(str(training_args.output_dir))
    before, after = heldout(before, "eval"), heldout(after, "eval")
    return run.finish(
        trainer,
        result,
        script_args,
        train_raw,
        cutoff=stage_cutoff,
        heldout=Heldout(
            "rewards/accuracies",
            after=after.get("rewards/accuracies"),
            before=before.get("rewards/accuracies"),
            examples=len(test_raw),
            detail={"before": before, "after": after},
        )
        if test_raw is not None
        else None,
        metrics={
            "loss_type": list(training_args.loss_type),
            "beta": training_args.beta,
            "train_last_logged": {k: (record.logged(trainer, k) or [None])[-1] for k in HELDOUT_KEYS},
        },
    )

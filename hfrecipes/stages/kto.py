"""Kahneman-Tversky optimisation: the policy learns from unpaired feedback, each completion judged alone (`label`
true: desirable, false: undesirable; the thumbs up and down deployed systems collect), against a frozen reference.

The reference is the parent checkpoint: a second copy for full training, the same model with its adapter disabled
under LoRA (no second copy). Held-out rewards (beta x the policy's log-probability ratio to the reference) are
measured before and after training; the held-out metric is their margin, desirable minus undesirable, which starts
at zero (the policy is its reference) and rises as the policy learns the judgments.

hfrecipes kto --config tiny/kto
hfrecipes kto --config tiny/kto_lora --max_steps 50
accelerate launch -m hfrecipes kto --config smollm2-135m-instruct/kto/lora
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
from hfrecipes.stages.common import FineTuneDefaults, LogitsHeadOption, frozen_reference, logits_lm_heads

STAGE = "kto"
FACTS = StageFacts(columns=(("prompt", "completion", "label"),))
HELDOUT_KEYS = ("rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")
# TRL's loss types that estimate the KL term from each row's prompt paired with its neighbour's completion
KL_LOSSES = ("kto",)


@dataclass
class KTOConfig(FineTuneDefaults, LogitsHeadOption, trl.KTOConfig):
    """`trl.KTOConfig` with the fine-tuning defaults and the `logits_lm_head` switch of `stages/common.py`; what
    TRL's trainer refuses only once the model has loaded is refused when parsed."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type in KL_LOSSES and self.train_sampling_strategy != "sequential":
            raise ValueError(
                f"train_sampling_strategy '{self.train_sampling_strategy}' with loss_type '{self.loss_type}': the KL "
                "term pairs each row with its neighbour's completion in a fixed order, so it must be 'sequential' "
                "(or use loss_type apo_zero_unpaired, which has no KL term)"
            )
        if self.loss_type in KL_LOSSES and self.per_device_train_batch_size < 2:
            raise ValueError(
                f"per_device_train_batch_size {self.per_device_train_batch_size} with loss_type '{self.loss_type}': "
                "the KL term pairs rows within a device's batch, which needs at least 2"
            )


DATACLASSES = (ScriptArguments, KTOConfig, ModelConfig)


class KTOTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, trl.KTOTrainer):
    """`trl.KTOTrainer` that owns the model card (ours is written from the stage record) and, where
    `logits_lm_head` is on, scores tokens from plain logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        logits_lm_heads(self, ("log_probs", "entropy", "mean_logits"))  # the fields TRL's KTO loss and logs read


def heldout(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The held-out numbers of one evaluation. TRL logs the margin only from batches that hold both kinds of
    completion; where none did, it is the desirable mean reward less the undesirable one."""
    out = {k: metrics[f"{prefix}_{k}"] for k in HELDOUT_KEYS if f"{prefix}_{k}" in metrics}
    if "rewards/margins" not in out and "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def run(script_args: ScriptArguments, training_args: KTOConfig, model_args: ModelConfig, recipe: dict):
    """Optimise the policy on judged completions and write the stage folder; returns (output_dir, record)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    modeling.check_model_args(model_args, parent_stage="sft")
    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)

    # Data: load and check before any model exists (the columns, and `label` booleans of both kinds).
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
    trainer = KTOTrainer(
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
            "rewards/margins",
            after=after.get("rewards/margins"),
            before=before.get("rewards/margins"),
            examples=len(test_raw),
            detail={"before": before, "after": after},
        )
        if test_raw is not None
        else None,
        metrics={
            "loss_type": training_args.loss_type,
            "beta": training_args.beta,
            "desirable_weight": training_args.desirable_weight,
            "undesirable_weight": training_args.undesirable_weight,
            "train_last_logged": {k: (record.logged(trainer, k) or [None])[-1] for k in HELDOUT_KEYS},
        },
    )

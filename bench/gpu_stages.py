"""Parts 2 and 3 of `bench/gpu.sh`: the fine-tuning stages against plain TRL, and the RL stages' generation share.

    python bench/gpu_bench.py finetune [--smoke]   # sft, reward, dpo: steady seconds per step, stage and TRL
    python bench/gpu_bench.py rl [--smoke]         # grpo, ppo: seconds per step, share of it spent generating

Both fine-tune the ~125M Llama of `gpu_bench.finetune_model` (random weights, the tiny tokenizer).
- finetune: each stage runs on conversations cut from the tiny corpus (SFT replies of about max_length tokens,
  preference replies of about 0.4 x max_length), then TRL's own trainer (SFTTrainer, RewardTrainer, DPOTrainer) runs
  the same model path, data file and tokenizer with the stage's resolved config copied field by field into TRL's
  config class (batch, max length, precision, optimizer, gradient checkpointing, loss: the same work a step); so the
  ratio is what the stage adds over TRL: its trainer subclass, callbacks and data preparation. The stage defaults
  that differ from TRL's are printed.
- rl: GRPO (8 prompts x 8 replies of 128 tokens a step) and PPO (64 replies of 128 tokens a step, 4 epochs x 4
  minibatches), on the tiny task's prompts with the exact-answer reward; every `generate` call is timed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

from bench.common import generation_shares, median, timed_steps
from bench.gpu_bench import (
    corpus_documents,
    finetune_model,
    free_memory,
    quiet_stage,
    short,
    steady_of,
    sync,
    window_rate,
)

# TRL's trainer and config for each fine-tuning stage
TRL_CLASSES = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "reward": ("RewardConfig", "RewardTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
}
# Config fields not copied from the stage to TRL: where each run writes and reports (the model's dtype is set apart)
NOT_COPIED = {"output_dir", "logging_dir", "run_name", "report_to", "hub_model_id", "push_to_hub", "model_init_kwargs"}
# Stage values that differ from TRL's defaults are printed, save for these: the bench sets them, or they are not work
NOT_SHOWN = NOT_COPIED | {
    "max_steps", "learning_rate", "per_device_train_batch_size", "max_length", "seed", "logging_steps",
    "save_strategy", "save_total_limit", "dataset_num_proc", "disable_tqdm",
}  # fmt: skip


def finetune_data(work: Path, model_dir: str, max_length: int, rows: int, smoke: bool) -> dict[str, Path]:
    """SFT conversations and preference pairs cut from the tiny corpus, sized to `max_length` tokens."""
    from hfrecipes.modeling import load_tokenizer
    from hfrecipes.tiny import task

    tok = load_tokenizer(model_dir)
    ids = tok("\n".join(d["text"] for d in corpus_documents(smoke)))["input_ids"]
    rng = random.Random(0)
    pairs = task.all_pairs()

    def text(n: int) -> str:
        start = rng.randrange(len(ids) - n)
        return tok.decode(ids[start : start + n])

    def user() -> list[dict]:
        return [{"role": "user", "content": task.question(*rng.choice(pairs))}]

    sft = [
        {"messages": user() + [{"role": "assistant", "content": text(int(0.85 * max_length))}]} for _ in range(rows)
    ]
    # prompt and reply must fit max_length: the reward trainer drops a pair that does not
    pref = [
        {
            "prompt": user(),
            "chosen": [{"role": "assistant", "content": text(int(0.4 * max_length))}],
            "rejected": [{"role": "assistant", "content": text(int(0.4 * max_length))}],
        }
        for _ in range(rows)
    ]
    files = {"sft": work / "sft.jsonl", "reward": work / "preference.jsonl", "dpo": work / "preference.jsonl"}
    files["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    files["reward"].write_text("".join(json.dumps(r) + "\n" for r in pref))
    return files


def trl_run(stage: str, times, model_dir: str, data: Path, work: Path, sync_steps: set[int]) -> list[float]:
    """Step-end stamps of TRL's own trainer on the stage's model, data and resolved config (`times`: the stage's
    `StepTimes`), waiting for the device at the end of the steps in `sync_steps`."""
    import datasets
    import trl
    from transformers import TrainerCallback

    from hfrecipes.modeling import load_tokenizer

    out = tempfile.mkdtemp(dir=work, prefix=f"trl-{stage}-")
    config_name, trainer_name = TRL_CLASSES[stage]
    config_cls, trainer_cls = getattr(trl, config_name), getattr(trl, trainer_name)
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    values = {k: v for k, v in times.trainer_args.to_dict().items() if k in fields and k not in NOT_COPIED}
    values = {k: v for k, v in values.items() if not k.endswith("_token")}  # to_dict masks them
    # TRL's defaults as its config resolves them on this device, written as to_dict writes the stage's
    device = {k: values[k] for k in ("use_cpu", "bf16", "fp16") if k in values}
    defaults = config_cls(output_dir=out, **device).to_dict()
    differ = [
        f"{k}={v!r} (TRL: {defaults.get(k)!r})"
        for k, v in sorted(values.items())
        if k not in NOT_SHOWN and v != defaults.get(k)
    ]
    if differ:
        print(f"  {stage} stage defaults that differ from TRL's (matched in the TRL run): {'; '.join(differ)}")
    config = config_cls(**values, output_dir=out, report_to="none", model_init_kwargs={"dtype": times.model_dtype})
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in sync_steps:
                sync()
            stamps.append(time.perf_counter())

    trainer = trainer_cls(
        model=model_dir,
        args=config,
        train_dataset=datasets.load_dataset("json", data_files=str(data), split="train"),
        processing_class=load_tokenizer(model_dir),
        callbacks=[Stamp()],
    )
    trainer.train()
    del trainer
    free_memory()
    return stamps


def finetune(work: Path, smoke: bool, results) -> None:
    import hfrecipes

    model_dir = finetune_model(work, smoke)
    batch, max_length, steps, skip = (4, 64, 6, 2) if smoke else (16, 512, 40, 10)
    files = finetune_data(work, model_dir, max_length, batch * steps, smoke)
    print(f"fine-tuning: batch {batch}, max_length {max_length}, {steps} steps ({skip} warm-up) each side")
    for stage in ("sft", "reward", "dpo"):
        keys = dict(
            quiet_stage(work, stage),
            model_name_or_path=model_dir,
            dataset_name=str(files[stage]),
            max_length=max_length,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=1e-5,
        )
        try:
            with timed_steps(sync_steps={skip, steps}) as times:
                out = getattr(hfrecipes, stage)(None, **keys)
            free_memory()
            stage_s = 1 / window_rate(times.stamps, skip)
            trl_stamps = trl_run(stage, times, model_dir, files[stage], work, sync_steps={skip, steps})
            trl_s = 1 / window_rate(trl_stamps, skip)
        except Exception as e:  # one stage failing leaves the others
            print(f"{stage}: failed: {short(e)}")
            free_memory()
            continue
        results.emit(
            f"{stage} stage: steady seconds per step",
            stage_s,
            "s/step",
            baseline=f"TRL {TRL_CLASSES[stage][1]}, same config",
            baseline_value=trl_s,
            ratio=trl_s / stage_s,  # speed of the stage over TRL's
            target=("ratio", ">=", 0.95),
            steps=steps,
            warmup_steps=skip,
            batch=batch,
            max_length=max_length,
            model_dtype=times.model_dtype,
            attn_implementation=times.attn_implementation,
            **steady_of(out.record),
        )


def rl(work: Path, smoke: bool, results) -> None:
    model_dir = finetune_model(work, smoke)
    common = dict(
        model_name_or_path=model_dir,
        dataset_name="tiny:prompts",
        dataset_columns={"answer": "solution"},
        reward_funcs=["accuracy"],
    )
    reply = 8 if smoke else 128
    runs = {
        "grpo": dict(
            num_generations=8,
            per_device_train_batch_size=16 if smoke else 64,
            max_completion_length=reply,
            max_steps=3 if smoke else 6,
            learning_rate=1e-6,
            eval_before=False,
        ),
        "ppo": dict(
            per_device_train_batch_size=4 if smoke else 16,
            num_mini_batches=2 if smoke else 4,
            num_ppo_epochs=1 if smoke else 4,
            max_new_tokens=reply,
            max_steps=3 if smoke else 5,
            learning_rate=3e-6,
        ),
    }
    for stage, keys in runs.items():
        try:
            steps = generation_shares(
                stage, None, {**quiet_stage(work, stage), **common, **keys}, skip=1 if smoke else 2
            )
        except Exception as e:
            print(f"{stage}: failed: {short(e)}")
            free_memory()
            continue
        free_memory()
        replies = keys["per_device_train_batch_size"] * keys.get("num_mini_batches", 1)
        total, share = median([s for s, _ in steps]), median([g / s for s, g in steps])
        what = dict(replies_per_step=replies, reply_tokens=reply, timed_steps=len(steps))
        results.emit(f"{stage} stage: seconds per step", total, "s/step", **what)
        results.emit(f"{stage} stage: share of a step spent generating", share, "fraction", **what)

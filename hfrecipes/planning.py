"""Plan a stage before it trains: its parameters N, tokens D, FLOPs, time on this machine, dollars, energy and CO2,
with no weights loaded, nothing trained and nothing written.

    hfrecipes sft --config tiny/sft --plan
    hfrecipes lifecycle tiny/lifecycle --plan

Every planned number is an estimate, and the plan says how each was made:

- N: the model built from its config on the meta device (no weights) with the head and LoRA adapter the stage adds,
  counted as the record counts it (`record.parameter_count`). A lifecycle stage whose parent has not run yet takes
  the parent's planned config and tokenizer (`Model`).
- D: optimizer steps (`max_steps`, else epochs over the rows) x examples a step (per-device batch x gradient
  accumulation x processes) x tokens an example, counted as the stage's record counts `tokens_seen` (its
  `FACTS.tokens`): `blocks` is pretraining's packed block, exact; `rows` one tokenised row, `pairs` a chosen and a
  rejected sequence with their prompt, their mean over a sample of the training rows with the stage's tokenizer;
  `rollouts` a prompt (sampled as above) and a reply of at most `max_completion_length` (`max_new_tokens` for PPO)
  tokens, taken in full, so a policy whose replies stop sooner sees fewer.
- FLOPs: the record's own formula (`record.compute_summary`): 6·N·D, plus a distillation teacher's 2·N_teacher·D.
- Seconds: FLOPs / (this machine's matmul rate x utilisation). The rate is measured once per process by a short
  matmul in the dtype the stage trains in, on the device it trains on (`matmul_rate`); the utilisation is the share
  of that rate training reaches, a default per device kind (`UTILISATION`) or the caller's.
- Device-hours, dollars, energy and CO2: `costs.stage_costs` on the planned seconds, with the recipe's price
  overrides and the device table, as the record prices the real run.

Simplifications: the seconds count no evaluation, gold check or checkpoint save, and no work outside 6·N·D (a frozen
reference's forward passes, generating replies, PPO's extra epochs): the utilisation is all there is to absorb them,
so a stage heavy in such work runs longer than planned. A stage that stops early (a plateau, a gold check) trains
fewer steps than planned. After the run the card and the lifecycle summary put the plan beside what was measured.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

from hfrecipes.errors import UsageError

# The share of the measured matmul rate a training step reaches, by device kind: planning figures, to replace with
# the ratio a first run shows (`--plan-utilisation`). A CPU trains a small model in small matmuls, between which
# attention, normalisation, the optimizer and the data collation run at a fraction of the matmul rate; a stage that
# generates replies (grpo, rloo, ppo, distill) or runs a frozen reference (dpo, kto) spends time its 6·N·D does not
# count, so it reaches less. A GPU running a large model spends most of a step in large matmuls: large-model training
# reaches about 40% of peak (`costs.DEFAULT_MFU`) where a large bf16 matmul reaches about 80%.
UTILISATION = {"cpu": 0.3, "mps": 0.3, "cuda": 0.5, "xpu": 0.5}
SAMPLE_ROWS = 256  # training rows tokenised to estimate a row's length: a few seconds at most, a stable mean
MATMUL_SECONDS = 0.25  # how long the matmul benchmark runs
MATMUL_SIZE = {"cpu": 512, "mps": 2048, "cuda": 4096, "xpu": 4096}  # square matmuls: as large as a device fills


class Model(NamedTuple):
    """What a later stage reads from a stage that has not run yet, to be planned: its model config and tokenizer."""

    config: Any
    tokenizer: Any


# ------------------------------------------------------------------------------------------------- the rate


def stage_device(training_args) -> tuple[str, str]:
    """The device kind and the dtype the stage's matmuls run in: bf16 or fp16 mixed precision where the config says
    so (resolved by `modeling.resolve_device_defaults`), fp32 otherwise."""
    from hfrecipes.record import device_info

    kind = "cpu" if getattr(training_args, "use_cpu", False) else device_info(1)["kind"]
    dtype = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else "float32"
    return kind, dtype


@functools.cache
def _rate(kind: str, dtype: str, threads: int, tf32: bool) -> float:
    import torch

    n = MATMUL_SIZE.get(kind, 1024)
    a = torch.randn(n, n, device=kind, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=kind, dtype=getattr(torch, dtype))

    def sync():
        if kind == "cuda":
            torch.cuda.synchronize()
        elif kind == "mps":
            torch.mps.synchronize()

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a @ b  # the first call sets up kernels and threads
        sync()
        reps, elapsed = 1, 0.0
        while elapsed < MATMUL_SECONDS / 2:  # double the batch until one batch takes long enough to time
            reps *= 2
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            elapsed = time.perf_counter() - start
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2.0 * n**3 * reps / elapsed


def matmul_rate(training_args) -> dict[str, Any]:
    """This machine's matmul rate (FLOP/s) where the stage trains, measured once per process (a fraction of a
    second) with the threads torch uses now, and how it was measured."""
    import torch

    kind, dtype = stage_device(training_args)
    tf32 = bool(getattr(training_args, "tf32", False))
    n = MATMUL_SIZE.get(kind, 1024)
    rate = _rate(kind, dtype, torch.get_num_threads(), tf32)
    threads = f", {torch.get_num_threads()} thread(s)" if kind == "cpu" else ""
    how = f"{n}x{n} {dtype}{' (TF32)' if tf32 and dtype == 'float32' else ''} matmuls on {kind}{threads}"
    return {"kind": kind, "dtype": dtype, "flops_per_second": rate, "how": how}


# ------------------------------------------------------------------------------------------------------ N


def _config_of(source: str, trust_remote_code: bool):
    """A checkpoint's model config without its weights: a folder or Hub id, or, for a LoRA stage folder, its base
    (the stage merges the adapter into the base, which keeps the base's shape)."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if (path / "adapter_config.json").is_file():
        try:
            source = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (ValueError, KeyError) as e:
            raise UsageError(f"{path}/adapter_config.json names no base model ({e}); the adapter is broken.") from None
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"'{source}': its model config could not be read to plan the stage ({e}).") from None


def count_params(config, head: str = "causal_lm", model_args=None) -> int:
    """Parameters of the model a stage trains, built on the meta device (no memory, no weights): `head` a key of
    `modeling.HEADS` (a reward model's one output), with the recipe's LoRA adapter where it sets one."""
    import copy

    import torch
    import transformers

    from hfrecipes.modeling import HEADS, peft_config
    from hfrecipes.record import parameter_count

    config = copy.deepcopy(config)
    if head == "reward":
        config.num_labels = 1
    auto = getattr(transformers, HEADS[head].auto_class)
    with torch.device("meta"):  # shapes without memory; tied weights stay tied, so each counts once
        model = auto.from_config(config)
        lora = peft_config(model_args, task_type="SEQ_CLS" if head == "reward" else None) if model_args else None
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
    return parameter_count(model)


def folder_key(path: str | Path) -> str:
    """A folder as plans name it: absolute, so two spellings of one folder match."""
    return str(Path(path).expanduser().absolute())


# ------------------------------------------------------------------------------------------------------ D


def _length(tokenizer, value, generation_prompt: bool = False) -> int:
    """Tokens of a text or of a conversation through the chat template."""
    if isinstance(value, list):
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(value, tokenize=True, add_generation_prompt=generation_prompt)
            return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        value = "\n".join(str(m.get("content", "")) for m in value)
    return len(tokenizer(str(value), add_special_tokens=False)["input_ids"])


def _sequence(tokenizer, prompt, completion) -> int:
    """A prompt and its completion as one training sequence: one conversation, or two texts and an end token."""
    if isinstance(prompt, list) or isinstance(completion, list):
        as_list = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
        return _length(tokenizer, as_list + (completion if isinstance(completion, list) else []))
    return _length(tokenizer, prompt or "") + _length(tokenizer, completion) + 1


def _sample(rows) -> list[dict[str, Any]]:
    """Up to SAMPLE_ROWS rows evenly spread over the training split (the trainer shuffles them)."""
    step = max(1, len(rows) // SAMPLE_ROWS)
    return [rows[i] for i in range(0, len(rows), step)][:SAMPLE_ROWS]


def _row_tokens(kind: str, rows, tokenizer, args) -> tuple[float, str]:
    """Mean tokens an example of `kind` (a stage's `FACTS.tokens`) adds to the record's `tokens_seen`."""
    sample = _sample(rows)
    limit = getattr(args, "max_length", None)

    def cut(n: int) -> int:
        return min(n, limit) if limit else n

    if kind == "blocks":  # a document and its end token, as pretraining packs it
        lengths = [_length(tokenizer, r["text"]) + 1 for r in sample]
        what = "a document"
    elif kind == "rows":
        if getattr(args, "packing", False) and limit:
            return float(limit), f"a packed sequence of max_length {limit}"
        lengths = [
            cut(_length(tokenizer, r["messages"]))
            if "messages" in r
            else cut(_sequence(tokenizer, r.get("prompt"), r.get("completion")))
            for r in sample
        ]
        what = "a tokenised row"
    elif kind == "pairs":
        lengths = [
            cut(_sequence(tokenizer, r.get("prompt"), r["chosen"]))
            + cut(_sequence(tokenizer, r.get("prompt"), r["rejected"]))
            for r in sample
        ]
        what = "a chosen and a rejected sequence with their prompt"
    else:
        reply = getattr(args, "max_completion_length", None) or getattr(args, "max_new_tokens", None) or 0
        system = getattr(args, "system_prompt", None)
        chat = hasattr(args, "system_prompt") and tokenizer.chat_template  # grpo and rloo ask text prompts as chat

        def prompt(p):
            if isinstance(p, str) and chat:
                p = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            return _length(tokenizer, p, generation_prompt=True)

        lengths = [prompt(r["prompt"]) + reply for r in sample]
        what = f"a prompt and a reply of at most {reply} tokens, taken in full"
    mean = sum(lengths) / len(lengths) if lengths else 0.0
    limit_text = f", cut at max_length {limit}" if limit and kind != "rollouts" else ""
    return mean, f"{what}{limit_text}: mean of {len(sample)} sampled training rows, an estimate"


def examples_per_step(training_args) -> int:
    """Examples one optimizer step reads over every process, as the stage's record counts them: PPO samples its whole
    rollout a step; GRPO and RLOO generate afresh every `num_iterations` steps."""
    per_device = getattr(training_args, "rollout_batch_size", None) or (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    )
    per_step = per_device * training_args.world_size
    return max(1, per_step // max(1, getattr(training_args, "num_iterations", 1) or 1))


# ------------------------------------------------------------------------------------------------- the plan


def _source_model(training_args, model_args, models, text, in_run: bool):
    """(config, tokenizer, how N is known) of the model the stage trains, without its weights. `text()` is the
    training text; `in_run`: see `plan_stage`."""
    from hfrecipes import modeling

    source = model_args.model_name_or_path
    if source and folder_key(source) in models:
        planned = models[folder_key(source)]
        return planned.config, planned.tokenizer, f"the planned output of '{source}', built on the meta device"
    if source:
        modeling.check_model_args(model_args)
        config = _config_of(source, model_args.trust_remote_code)
        tok = modeling.load_stage_tokenizer(model_args)
        return config, tok, f"the config of '{source}', built on the meta device"
    # pretraining from random weights: the tokenizer the run trains (or names) sets the vocabulary
    init, overrides = training_args.model_init_config, training_args.model_init_overrides
    if getattr(training_args, "train_tokenizer", False) and in_run:
        config = modeling.checked_init_config(init, overrides, model_args.trust_remote_code)
        config.vocab_size = training_args.tokenizer_vocab_size
        how = f"'{init}' config with tokenizer_vocab_size, the most the run's tokenizer can hold (an upper bound)"
        return config, None, f"{how}, built on the meta device"
    if getattr(training_args, "train_tokenizer", False):
        tok = modeling.train_tiny_tokenizer(
            text()["text"], training_args.tokenizer_vocab_size, training_args.block_size * 4
        )
        how_tok = "a tokenizer trained on the training text, as the run trains it"
    elif getattr(training_args, "tokenizer_name_or_path", None):
        named = training_args.tokenizer_name_or_path
        if folder_key(named) in models and models[folder_key(named)].tokenizer is not None:
            tok = models[folder_key(named)].tokenizer  # an earlier stage's folder, not written yet: its plan's
        else:
            tok = modeling.load_tokenizer(named, model_args.trust_remote_code)
        how_tok = f"tokenizer '{named}'"
    else:
        raise UsageError(
            "pretraining from scratch needs a tokenizer: set train_tokenizer: true or tokenizer_name_or_path."
        )
    config = modeling.config_from(init, overrides, tok, model_args.trust_remote_code)
    return config, tok, f"'{init}' config with {how_tok}, built on the meta device"


def _teacher_params(training_args, model_args, models) -> int | None:
    source = getattr(training_args, "teacher_model_name_or_path", None)
    if not source:
        return None
    if folder_key(source) in models:
        return count_params(models[folder_key(source)].config)
    return count_params(_config_of(source, model_args.trust_remote_code))


def _steps(training_args, kind: str, rows: int, tokens_per_example: float, per_step: int) -> tuple[int, str]:
    if training_args.max_steps and training_args.max_steps > 0:
        return int(training_args.max_steps), "max_steps"
    examples = rows
    if kind == "blocks":  # the documents packed into blocks
        examples = int(rows * tokens_per_example // training_args.block_size)
    elif kind == "rollouts":
        examples = rows * (getattr(training_args, "num_generations", None) or 1)
    epochs = training_args.num_train_epochs
    steps = max(1, math.ceil(epochs * max(1, math.ceil(examples / per_step))))
    return steps, f"{epochs:g} epoch(s) of {examples} examples, an estimate"


def plan_stage(
    stage: str,
    args: tuple,
    models: dict[str, Model] | None = None,
    utilisation: float | None = None,
    in_run: bool = False,
) -> tuple[dict[str, Any], Model]:
    """The plan of one stage from its parsed dataclasses (`runner.parse_stage_args`), and the model it will write (for
    a later stage's plan). `models` maps a folder not yet written (a lifecycle stage planned earlier) to its model;
    `utilisation` replaces the default share of the matmul rate. Loads data and a tokenizer, never weights.

    `in_run`: the plan a single stage run makes of itself, which must cost a fraction of the run: a pretraining that
    trains its tokenizer is planned with the vocabulary it asks for (an upper bound) rather than training a second
    tokenizer, and, where max_steps fixes its steps, without reading its text; `--plan` and a lifecycle train it."""
    from hfrecipes import data
    from hfrecipes.costs import stage_costs
    from hfrecipes.record import device_info
    from hfrecipes.stages import get_stage

    models = models or {}
    script_args, training_args, model_args = args
    module = get_stage(stage)
    kind = module.FACTS.tokens
    if utilisation is not None and not 0 < utilisation <= 1:
        raise UsageError(f"--plan-utilisation must be above 0 and at most 1, got {utilisation:g}.")

    # the data the run reads, checked as the run checks it (a bad path is the run's own error)
    if script_args.dataset_columns is None and getattr(training_args, "dataset_text_field", "text") != "text":
        script_args.dataset_columns = {"text": training_args.dataset_text_field}

    @functools.cache
    def text():
        rows, _ = data.load_stage_data(script_args, stage, module.FACTS.columns)
        return data.apply_max_date(script_args, rows, None)[0] if kind == "blocks" else rows  # pretraining's stops

    fixed = bool(training_args.max_steps and training_args.max_steps > 0)
    if not (in_run and kind == "blocks" and fixed):
        text()
    config, tokenizer, params_source = _source_model(training_args, model_args, models, text, in_run)
    params = count_params(config, module.FACTS.head, model_args if model_args.use_peft else None)
    teacher = _teacher_params(training_args, model_args, models)

    per_step = examples_per_step(training_args)
    if kind == "blocks":
        per_example, example_source = float(training_args.block_size), "a packed block of block_size tokens, exact"
        if fixed:
            steps, steps_source = int(training_args.max_steps), "max_steps"
        else:
            if tokenizer is None:
                tokenizer = _source_model(training_args, model_args, models, text, in_run=False)[1]
            documents = _row_tokens("blocks", text(), tokenizer, None)[0]
            steps, steps_source = _steps(training_args, kind, len(text()), documents, per_step)
    else:
        per_example, example_source = _row_tokens(kind, text(), tokenizer, training_args)
        steps, steps_source = _steps(training_args, kind, len(text()), per_example, per_step)
    tokens = steps * per_step * per_example
    flops = 6.0 * params * tokens + (2.0 * teacher * tokens if teacher else 0.0)

    rate = matmul_rate(training_args)
    share = utilisation if utilisation is not None else UTILISATION.get(rate["kind"], UTILISATION["cpu"])
    seconds = flops / (rate["flops_per_second"] * share)
    device = device_info(training_args.world_size)
    costs = stage_costs(flops, seconds, device, script_args)
    plan = {
        "estimate": True,
        "stage": stage,
        "output_dir": str(training_args.output_dir),
        "params": params,
        "params_source": params_source,
        "teacher_params": teacher,
        "steps": steps,
        "steps_source": steps_source,
        "examples_per_step": per_step,
        "tokens_per_example": per_example,
        "tokens_per_example_source": example_source,
        "tokens": tokens,
        "flops": flops,
        "flops_formula": "6·N·D + 2·N_teacher·D" if teacher else "6·N·D",
        "matmul_flops_per_second": rate["flops_per_second"],
        "matmul": rate["how"],
        "utilisation": share,
        "utilisation_source": "given" if utilisation is not None else f"default for {rate['kind']}",
        "seconds": seconds,
        "device": device,
        **{k: costs[k] for k in ("device_hours", "dollars", "energy_kwh", "co2_kg", "price_per_hour", "cost_device")},
    }
    return plan, Model(config, tokenizer)


def totals(plans: list[dict[str, Any]]) -> dict[str, Any]:
    """The planned numbers summed over stages (None where a stage has no figure for one: an unknown price)."""
    keys = ("tokens", "flops", "seconds", "device_hours", "dollars", "energy_kwh", "co2_kg")
    return {k: None if any(p.get(k) is None for p in plans) else sum(p[k] for p in plans) for k in keys}

"""On-policy distillation: the student answers the prompts itself and learns, token by token, the teacher's
next-token distribution on its own replies (TRL's `DistillationTrainer`: the generalised Jensen-Shannon divergence of
Agarwal et al. 2024, `beta` 0 forward KL, 0.5 JSD, 1 reverse KL; `temperature` softens both distributions and the
sampling). The usual use is a smaller student that serves cheaper than its teacher.

The teacher (`teacher_model_name_or_path`: a stage folder or a Hub id) must share the student's vocabulary: its
tokenizer's ids and its config's `vocab_size` are compared from the two folders' files before any model loads. It is
loaded whole (no LoRA, no quantization, a LoRA stage folder merged in memory), frozen and in eval mode; nothing is
written to its folder. Its forward passes over the tokens the student trained on, 2 x its parameters x those tokens,
count in the stage's FLOPs (`record.compute_summary`), and the record's `teacher` block names it. Held-out: the share
of the teacher's greedy reply tokens the student also ranks first (both reading the teacher's reply), and the mean
per-token KL(teacher || student) there, before and after training.

hfrecipes distill --config tiny/distill
hfrecipes distill --config smollm2-135m-instruct/distill/cpu_lora
accelerate launch -m hfrecipes distill --config tiny/distill
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trl

from hfrecipes import data, engines, gold, modeling, record, vllm_support
from hfrecipes.data import ScriptArguments
from hfrecipes.errors import UsageError
from hfrecipes.modeling import ModelConfig
from hfrecipes.record import Heldout
from hfrecipes.report import card
from hfrecipes.stagerun import StageRun
from hfrecipes.stages import StageFacts, trainer_internals
from hfrecipes.stages.common import FineTuneDefaults, whole_weights

STAGE = "distill"
FACTS = StageFacts(columns=(("prompt",),), tokens="rollouts")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer.model", "config.json")


@dataclass
class DistillConfig(FineTuneDefaults, gold.GoldOptions, trl.DistillationConfig):
    """`trl.DistillationConfig` with the fine-tuning defaults of `stages/common.py`, the teacher required, the
    held-out agreement's reply length, and the gold check of `hfrecipes/gold.py` (the task's own accuracy while the
    student samples and learns; with no proxy reward it stops at a plateau and keeps the best check, as SFT's). The
    stage loads both models itself, the teacher like the student (the recipe's `dtype` and `attn_implementation`), so
    TRL's `model_init_kwargs` and `teacher_model_init_kwargs` are no keys here."""

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher: a stage folder or a Hub id with the student's vocabulary (tokenizer and "
            "vocab_size). Loaded whole and frozen; its folder is only read."
        },
    )
    eval_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens of the teacher's greedy held-out replies; default max_completion_length."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(default=None, init=False)
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher_model_name_or_path:
            raise ValueError(
                "teacher_model_name_or_path is required: the model the student learns from, e.g. runs/tiny/grpo"
            )
        if self.teacher_model_name_or_path.endswith(".gguf"):
            raise ValueError(
                f"teacher_model_name_or_path '{self.teacher_model_name_or_path}' is a GGUF file: convert it once "
                "(hfrecipes convert FILE FOLDER) and name the folder"
            )


DATACLASSES = (ScriptArguments, DistillConfig, ModelConfig)


class DistillTrainer(card.OwnsCard, trainer_internals.WholeCheckpoints, trl.DistillationTrainer):
    """`trl.DistillationTrainer` that owns the model card (ours is written from the stage record)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            vllm_support.fit_colocate_weight_sync(self.vllm_generation)


# ------------------------------------------------------------------------------------------ the shared vocabulary


def _files(name: str, revision: str | None) -> Path:
    """The folder holding a checkpoint's tokenizer and config files: the local folder, or those few files of a Hub
    repository (no weights)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, revision=revision, allow_patterns=list(TOKENIZER_FILES)))
        except Exception as e:  # offline, no such repository, no access: each its own huggingface_hub error
            raise UsageError(f"the tokenizer and config of '{name}' could not be read: {e}") from None
    return path


def _config_vocab_size(folder: Path) -> int | None:
    """The config's vocab_size; a LoRA stage folder's is its base model's."""
    if modeling.is_adapter(folder):
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return _config_vocab_size(_files(base, None)) if base else None
    config = folder / "config.json"
    if not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    return cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))


def vocabulary(name: str, revision: str | None = None) -> tuple[dict[int, str] | bytes | None, int | None]:
    """A checkpoint's vocabulary read from its files, no weights loaded: its tokenizer's id -> token map
    (tokenizer.json, else vocab.json with added_tokens.json; a SentencePiece tokenizer.model as its bytes), and its
    config's vocab_size."""
    folder = _files(name, revision)
    vocab: dict[int, str] | bytes | None = None
    if (folder / "tokenizer.json").is_file():
        tok = json.loads((folder / "tokenizer.json").read_text())
        model_vocab = (tok.get("model") or {}).get("vocab") or {}
        if isinstance(model_vocab, dict):
            vocab = {int(i): t for t, i in model_vocab.items()}
        else:  # Unigram: a list of [piece, score], the id is the position
            vocab = {i: piece[0] for i, piece in enumerate(model_vocab)}
        vocab.update({int(a["id"]): a["content"] for a in tok.get("added_tokens") or []})
    elif (folder / "vocab.json").is_file():
        vocab = {int(i): t for t, i in json.loads((folder / "vocab.json").read_text()).items()}
        added = folder / "added_tokens.json"
        if added.is_file():
            vocab.update({int(i): t for t, i in json.loads(added.read_text()).items()})
    elif (folder / "tokenizer.model").is_file():
        vocab = (folder / "tokenizer.model").read_bytes()
    return vocab, _config_vocab_size(folder)


def check_shared_vocabulary(
    student: str, teacher: str, student_revision: str | None = None, teacher_revision: str | None = None
) -> None:
    """Refuse a teacher whose vocabulary is not the student's: the divergence compares the two next-token
    distributions id by id, so every id must be the same token in both, and both heads must be as wide."""
    mine, my_size = vocabulary(student, student_revision)
    theirs, their_size = vocabulary(teacher, teacher_revision)
    differs = []
    if my_size != their_size:
        differs.append(f"vocab_size {my_size} (student) vs {their_size} (teacher)")
    if mine is None or theirs is None:
        lacking = [n for n, v in ((student, mine), (teacher, theirs)) if v is None]
        differs.append(f"no tokenizer file to compare in {', '.join(repr(n) for n in lacking)}")
    elif isinstance(mine, bytes) or isinstance(theirs, bytes):
        if mine != theirs:
            differs.append("their tokenizer files differ")
    elif mine != theirs:
        changed = sorted(i for i in mine.keys() & theirs.keys() if mine[i] != theirs[i])
        alone = len(mine.keys() ^ theirs.keys())
        text = f"the tokenizers have {len(mine)} and {len(theirs)} tokens, {len(changed)} ids name other tokens"
        if changed:
            i = changed[0]
            text += f" (id {i} is {mine[i]!r} in the student, {theirs[i]!r} in the teacher)"
        differs.append(text + (f", {alone} ids are in one only" if alone else ""))
    if differs:
        raise UsageError(
            f"the teacher '{teacher}' (teacher_model_name_or_path) and the student '{student}' (model_name_or_path) "
            f"do not share a vocabulary: {'; '.join(differs)}. Distillation compares the two models' next-token "
            "distributions token by token; choose a teacher with the student's tokenizer (the same model family)."
        )


def check_teacher(training_args: DistillConfig, model_args: ModelConfig) -> dict[str, Any] | None:
    """Everything about the teacher that can be wrong, found before any model loads: it exists, its files are whole,
    it shares the student's vocabulary. Returns the teacher's own record, where it has one."""
    teacher = training_args.teacher_model_name_or_path
    modeling.check_model_path(teacher, "teacher_model_name_or_path")
    check_shared_vocabulary(
        model_args.model_name_or_path, teacher, model_args.model_revision, training_args.teacher_model_revision
    )
    return record.read_record(teacher) if Path(teacher).expanduser().is_dir() else None


def load_teacher(training_args: DistillConfig, model_args: ModelConfig):
    """The teacher whole and frozen, in eval mode: loaded as the student is (dtype, attention, remote code,
    safetensors only) but never quantized or given an adapter; a LoRA stage folder is merged in memory, so the
    teacher's folder is only read."""
    name = training_args.teacher_model_name_or_path
    folder = Path(name).expanduser()
    if modeling.is_adapter(folder):
        teacher, _ = modeling.load_merged(folder, model_args.dtype or "auto", model_args.trust_remote_code)
    else:
        whole = dataclasses.replace(
            model_args,
            model_name_or_path=name,
            model_revision=training_args.teacher_model_revision or "main",
            gguf_file=None,
            use_peft=False,
            load_in_4bit=False,
            load_in_8bit=False,
        )
        with engines.every_process_loads():  # TRL prepares it for evaluation only: no engine broadcasts its weights
            teacher = modeling.load_pretrained(whole)
    return teacher.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------- held-out


def _reply_logprobs(model, rows: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list:
    """Per (prompt ids, reply ids) row: the model's log-softmax (fp32, on the CPU) at the positions that predict the
    reply's tokens, reading prompt and reply."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = [p + r for p, r in rows[i : i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for j, (prompt, reply) in enumerate(rows[i : i + batch_size]):
            out.append(logits[j, len(prompt) - 1 : len(prompt) + len(reply) - 1].float().log_softmax(-1).cpu())
    model.train(was_training)
    return out


def teacher_replies(teacher, tokenizer, prompts: list, max_new_tokens: int) -> tuple[list, list]:
    """The teacher's greedy reply to each held-out prompt and its log-probabilities along it: what the student is
    measured against, computed once before training."""
    from hfrecipes.inference import generate_ids, prompt_ids

    ids = prompt_ids(tokenizer, prompts)
    replies = generate_ids(teacher, tokenizer, ids, max_new_tokens, desc=None)
    rows = [(p, r[0]) for p, r in zip(ids, replies, strict=True) if r[0]]
    return rows, _reply_logprobs(teacher, rows)


def agreement(student, targets: tuple[list, list]) -> dict[str, Any]:
    """How close the student is to the teacher on the teacher's held-out replies: the share of reply tokens where
    the student's most likely next token is the teacher's, and the mean per-token KL(teacher || student)."""
    rows, teacher_logps = targets
    agree, kl, tokens = 0, 0.0, 0
    for t, s in zip(teacher_logps, _reply_logprobs(student, rows), strict=True):
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        kl += float((t.exp() * (t - s)).sum())
        tokens += len(t)
    return {"agreement": agree / tokens, "kl": kl / tokens, "tokens": tokens, "prompts": len(rows)} if tokens else {}


def run(script_args: ScriptArguments, training_args: DistillConfig, model_args: ModelConfig, recipe: dict):
    """Distil the teacher into the student and write the stage folder; returns (output_dir, record)."""
    # Records: refuse a folder we must not touch; find a checkpoint to resume; the parent is the student's record.
    modeling.check_model_args(model_args, parent_stage="pretrain")
    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)
    teacher_record = check_teacher(training_args, model_args)
    vllm_support.check_use_vllm(training_args.use_vllm)

    # Data: prompts, checked before any model exists; the student writes the replies.
    train_raw, test_raw = data.load_stage_data(script_args, STAGE, FACTS.columns)
    stage_cutoff = data.knowledge_cutoff([train_raw], script_args.dataset_date_column, script_args.knowledge_cutoff)
    gold_set = gold.load(script_args, training_args, STAGE)

    # Tokenizer: the student's (the teacher's ids are the same); TRL generates from left-padded prompts.
    tokenizer = modeling.load_stage_tokenizer(model_args)
    tokenizer.padding_side = "left"

    # Models: the student (full, LoRA or QLoRA from the recipe's switches) and the teacher, whole and frozen.
    run.start(training_args.process_index == 0)
    model = modeling.load_pretrained(model_args)
    teacher = load_teacher(training_args, model_args)
    if engines.requested() not in engines.SHARDED and getattr(model, "hf_quantizer", None) is None:
        model.to(training_args.device)  # where the trainer puts it, so the held-out replies use the GPU too
    if engines.requested() != "zero3":  # under ZeRO-3 TRL puts the teacher in an inference engine of its own
        teacher.to(training_args.device)
    # Held-out agreement on the main process only, or on every process where the weights are sharded (grpo's rule).
    main = training_args.process_index == 0
    evaluates = test_raw is not None and (main or engines.requested() in engines.SHARDED)
    targets, before = None, {}
    if evaluates:
        max_new_tokens = training_args.eval_max_new_tokens or training_args.max_completion_length
        with whole_weights(teacher) as whole:
            targets = teacher_replies(whole, tokenizer, test_raw["prompt"], max_new_tokens)
        with whole_weights(model) as whole:
            before = agreement(whole, targets)

    # Trainer.
    run.describe_teacher(teacher, training_args.teacher_model_name_or_path, teacher_record)
    trainer = DistillTrainer(
        model=model,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_raw,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(model_args),
        callbacks=run.callbacks(),
    )
    gold_check = gold.attach(
        trainer, gold_set, training_args, tokenizer, None, lambda: whole_weights(trainer.model, trainer)
    )
    run.describe_model(trainer.model, model_args.model_name_or_path, model_args)
    result = run.train(trainer)
    after = {}
    if evaluates:
        with whole_weights(trainer.model, trainer) as whole:
            after = agreement(whole, targets)
    if not main:
        before, after = {}, {}

    # Save: student (or adapter), tokenizer; record and card on the main process.
    trainer.save_model(str(training_args.output_dir))
    return run.finish(
        trainer,
        result,
        script_args,
        train_raw,
        cutoff=stage_cutoff,
        heldout=Heldout(
            "teacher_agreement",
            after=after.get("agreement"),
            before=before.get("agreement"),
            examples=after.get("prompts"),
            detail={"kl_before": before.get("kl"), "kl_after": after.get("kl"), "reply_tokens": after.get("tokens")},
        )
        if after
        else None,
        metrics={
            "beta": training_args.beta,
            "temperature": training_args.temperature,
            "entropy_last_logged": (record.logged(trainer, "entropy") or [None])[-1],
            **gold.metrics(gold_check),
        },
    )

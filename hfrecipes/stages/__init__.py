"""The stage registry: one literal dict, stage id -> (module, one-line description). Everything else about a stage
(the data columns it reads, the head of the model it writes, whether the lifecycle scores it) the stage's module
declares as `FACTS`; the CLI, the Python API, the lifecycle and the data checks read it from there.

Adding a stage: its module (Config, Trainer, `run()`, `DATACLASSES`, `FACTS`), one line here, its recipes under
`recipes/`, tests and docs. Modules import lazily so the CLI starts instantly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("hfrecipes.stages.pretrain", "Pretrain from random weights (or continue pretraining) on raw text."),
    "sft": (
        "hfrecipes.stages.sft",
        "Supervised fine-tuning on conversations or prompt/completion pairs (full, LoRA or QLoRA).",
    ),
    "reward": (
        "hfrecipes.stages.reward",
        "Train a reward model (a one-output classification head) on chosen/rejected pairs.",
    ),
    "dpo": (
        "hfrecipes.stages.dpo",
        "Direct preference optimisation against the parent checkpoint (any loss type TRL offers).",
    ),
    "kto": (
        "hfrecipes.stages.kto",
        "KTO from unpaired feedback (completions labelled desirable or not) against the parent checkpoint.",
    ),
    "grpo": (
        "hfrecipes.stages.grpo",
        "GRPO-style RL with verifiable rewards; held-out pass@1 before and after (full, LoRA or QLoRA).",
    ),
    "rloo": (
        "hfrecipes.stages.rloo",
        "RLOO: RL with verifiable rewards and a leave-one-out baseline; held-out pass@1 before and after.",
    ),
    "ppo": (
        "hfrecipes.stages.ppo",
        "PPO against a reward model and/or reward functions, with a KL penalty to the parent (full, LoRA or QLoRA).",
    ),
    "distill": (
        "hfrecipes.stages.distill",
        "On-policy distillation: the student learns a frozen teacher's next-token distributions on its own replies.",
    ),
}


@dataclass(frozen=True)
class StageFacts:
    """What a stage needs and makes, declared once in its module as `FACTS`.

    `columns`: the dataset columns it reads, any one of the sets (checked on the raw data before a model loads).
    `head`: the head of the model it writes, a key of `modeling.HEADS` (which also gives the Hub's auto class and
    pipeline tag). `scored`: the lifecycle scores its held-out task accuracy and may export and serve it.
    `tokens`: what one example adds to the record's `tokens_seen`, which the planner (`hfrecipes.planning`) counts
    alike: `blocks` a packed block, `rows` a tokenised row, `pairs` a chosen and a rejected sequence, `rollouts` a
    prompt and its generated reply.
    """

    columns: tuple[tuple[str, ...], ...]
    head: str = "causal_lm"
    scored: bool = True
    tokens: str = "rows"


def get_stage(stage_id: str) -> ModuleType:
    from hfrecipes.errors import UsageError

    if stage_id not in STAGES:
        raise UsageError(f"unknown stage '{stage_id}'; the stages are: {', '.join(STAGES)}.")
    return importlib.import_module(STAGES[stage_id][0])


def describe(stage_id: str) -> str:
    """The stage's one-line description (CLI help, Python API docstring), without importing its module."""
    return STAGES[stage_id][1]


def facts(stage_id: str) -> StageFacts:
    """The facts the stage's module declares (imports the module)."""
    return get_stage(stage_id).FACTS


def scored_stages() -> tuple[str, ...]:
    """The stages whose output the lifecycle scores on its held-out task (causal LMs it can export and serve)."""
    return tuple(s for s in STAGES if facts(s).scored)

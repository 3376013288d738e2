"""The stage registry: one literal dict, stage id -> module. Modules import lazily so the CLI starts instantly."""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "pretrain": "hfrecipes.stages.pretrain",
    "sft": "hfrecipes.stages.sft",
    "reward": "hfrecipes.stages.reward",
    "dpo": "hfrecipes.stages.dpo",
    "grpo": "hfrecipes.stages.grpo",
    "ppo": "hfrecipes.stages.ppo",
}


def get_stage(stage_id: str) -> ModuleType:
    from hfrecipes.errors import UsageError

    if stage_id not in STAGES:
        raise UsageError(f"unknown stage '{stage_id}'; the stages are: {', '.join(STAGES)}.")
    return importlib.import_module(STAGES[stage_id])

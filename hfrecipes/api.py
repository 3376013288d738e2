"""The Python API: every CLI command as a function. `hfrecipes.pretrain("tiny/pretrain", max_steps=50)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


class StageResult(NamedTuple):
    output_dir: Path
    record: dict[str, Any]


def parse_stage_args(stage: str, recipe: str | Path | None, cli_args: list[str] | None = None, **overrides):
    """(dataclass instances, resolved recipe) for `stage`, without running anything."""
    from hfrecipes.recipe import parse
    from hfrecipes.stages import get_stage

    module = get_stage(stage)
    return parse(module.DATACLASSES, recipe, cli_args=cli_args, overrides=overrides)


def run_stage(stage: str, recipe: str | Path | None, cli_args: list[str] | None = None, **overrides) -> StageResult:
    """Run one stage from a recipe (a path or a bundled name) with keyword overrides of any recipe key."""
    from hfrecipes.stages import get_stage

    args, resolved = parse_stage_args(stage, recipe, cli_args, **overrides)
    output_dir, rec = get_stage(stage).run(*args, recipe=resolved)
    return StageResult(Path(output_dir), rec)


def pretrain(recipe: str | Path = "tiny/pretrain", **overrides) -> StageResult:
    """Pretrain from random weights (or continue pretraining) on raw text."""
    return run_stage("pretrain", recipe, **overrides)


def sft(recipe: str | Path = "tiny/sft", **overrides) -> StageResult:
    """Supervised fine-tuning on conversations or prompt/completion pairs (full, LoRA or QLoRA)."""
    return run_stage("sft", recipe, **overrides)


def reward(recipe: str | Path = "tiny/reward", **overrides) -> StageResult:
    """Train a reward model (a one-output classification head) on chosen/rejected pairs."""
    return run_stage("reward", recipe, **overrides)


def dpo(recipe: str | Path = "tiny/dpo", **overrides) -> StageResult:
    """Direct preference optimisation against the parent checkpoint (any loss type TRL offers)."""
    return run_stage("dpo", recipe, **overrides)


def recipes() -> list[str]:
    """The bundled recipe names."""
    from hfrecipes.recipe import list_recipes

    return list_recipes()

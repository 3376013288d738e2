"""The stage runner: parse a stage's recipe into its dataclasses and run it. The API, the CLI and the lifecycle
runner all start stages here.

    from hfrecipes.runner import run_stage
    run_stage("sft", "tiny/sft", max_steps=5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from hfrecipes.recipe import parse
from hfrecipes.record import read_record
from hfrecipes.stages import get_stage


class StageResult(NamedTuple):
    output_dir: Path
    record: dict[str, Any]


def parse_stage_args(stage: str, recipe: str | Path | None, cli_args: list[str] | None = None, **overrides):
    """(dataclass instances, resolved recipe) for `stage`, without running anything."""
    return parse(get_stage(stage).DATACLASSES, recipe, cli_args=cli_args, overrides=overrides)


def run_stage(stage: str, recipe: str | Path | None, cli_args: list[str] | None = None, **overrides) -> StageResult:
    """Run one stage from a recipe (a path or a bundled name) with keyword overrides of any recipe key."""
    from hfrecipes import hub, modeling  # torch and TRL: loaded when a stage runs, not when the CLI starts

    args, resolved = parse_stage_args(stage, recipe, cli_args, **overrides)
    modeling.check_device(resolved["values"])
    push_to = hub.take_over_push(*args)
    output_dir, rec = get_stage(stage).run(*args, recipe=resolved)
    if push_to and all(getattr(a, "process_index", 0) == 0 for a in args):
        hub.push(output_dir, **push_to)
        rec = read_record(output_dir)
    return StageResult(Path(output_dir), rec)

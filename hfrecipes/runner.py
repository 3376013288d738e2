"""The stage runner: parse a stage's recipe into its dataclasses and run it. The API, the CLI and the lifecycle
runner all start stages here.

    from hfrecipes.runner import run_stage
    run_stage("sft", "tiny/sft", max_steps=5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from hfrecipes.recipe import check_inputs, parse
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
    from hfrecipes import engines, hub, modeling  # torch and TRL: loaded when a stage runs, not when the CLI starts

    engines.check_environment()
    engines.fsdp_on_cpu()
    args, resolved = parse_stage_args(stage, recipe, cli_args, **overrides)
    check_inputs({k: v for a in args for k, v in vars(a).items()}, resolved["path"] or "arguments")
    modeling.check_device(resolved["values"])
    init = next((a for a in args if hasattr(a, "model_init_overrides")), None)
    model_args = next((a for a in args if hasattr(a, "model_name_or_path")), None)
    if init is not None and init.model_init_overrides and not model_args.model_name_or_path:
        modeling.checked_init_config(init.model_init_config, init.model_init_overrides, model_args.trust_remote_code)
    engines.check_options(next((a for a in args if hasattr(a, "load_in_4bit")), None), stage)
    _convert_gguf(stage, args)
    push_to = hub.take_over_push(*args)
    output_dir, rec = get_stage(stage).run(*args, recipe=resolved)
    if push_to and all(getattr(a, "process_index", 0) == 0 for a in args):
        hub.push(output_dir, **push_to)
        rec = read_record(output_dir)
    return StageResult(Path(output_dir), rec)


def _convert_gguf(stage: str, args) -> None:
    """A `.gguf` model becomes its converted folder (once, cached) before the stage sees it, so adapters name a base
    every library loads and the base's record heads the lineage. The output folder and the model's own switches are
    checked first: a refusal there costs no conversion."""
    from hfrecipes import converting, modeling
    from hfrecipes.record import check_output_dir

    model_args = next((a for a in args if hasattr(a, "gguf_file")), None)
    if model_args is None or not modeling.model_source(model_args)[1]:
        return
    modeling.check_model_args(model_args)
    out = next((a.output_dir for a in args if getattr(a, "output_dir", None)), None)
    if out:
        check_output_dir(out, stage)
    converting.resolve_gguf(model_args)

"""The stage runner: parse a stage's recipe into its dataclasses and run it. The API, the CLI and the lifecycle
runner all start stages here.

    from hfrecipes.runner import run_stage
    run_stage("sft", "tiny/sft", max_steps=5)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from hfrecipes.recipe import check_inputs, parse
from hfrecipes.record import read_record
from hfrecipes.stages import get_stage

logger = logging.getLogger(__name__)


class StageResult(NamedTuple):
    output_dir: Path
    record: dict[str, Any]


def parse_stage_args(stage: str, recipe: str | Path | None, cli_args: list[str] | None = None, **overrides):
    """(dataclass instances, resolved recipe) for `stage`, without running anything."""
    return parse(get_stage(stage).DATACLASSES, recipe, cli_args=cli_args, overrides=overrides)


def checked_stage_args(
    stage: str,
    recipe: str | Path | None,
    cli_args: list[str] | None = None,
    planned: tuple[str, ...] = (),
    **overrides,
):
    """`parse_stage_args`, then the checks a run makes before anything loads: local inputs exist (but for the
    folders in `planned`, which a lifecycle's earlier stages will write), the device has what the recipe asks for, the
    init config's overrides and the model switches fit the engine."""
    from hfrecipes import engines, modeling  # torch and TRL: loaded when a stage runs, not when the CLI starts

    engines.check_environment()
    args, resolved = parse_stage_args(stage, recipe, cli_args, **overrides)
    values = {k: v for a in args for k, v in vars(a).items()}
    later = {_absolute(p) for p in planned}
    check_inputs(
        {k: v for k, v in values.items() if not (isinstance(v, str) and _absolute(v) in later)},
        resolved["path"] or "arguments",
    )
    modeling.check_device(resolved["values"])
    init = next((a for a in args if hasattr(a, "model_init_overrides")), None)
    model_args = next((a for a in args if hasattr(a, "model_name_or_path")), None)
    if init is not None and init.model_init_overrides and not model_args.model_name_or_path:
        modeling.checked_init_config(init.model_init_config, init.model_init_overrides, model_args.trust_remote_code)
    engines.check_options(next((a for a in args if hasattr(a, "load_in_4bit")), None), stage)
    return args, resolved


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().absolute())


def plan_stage(
    stage: str,
    recipe: str | Path | None,
    cli_args: list[str] | None = None,
    utilisation: float | None = None,
    **overrides,
) -> dict[str, Any]:
    """The stage's plan (`hfrecipes.planning`): its tokens, FLOPs, estimated time here, dollars and energy, with no
    weights loaded, nothing trained and nothing written; bad input is refused as a run refuses it."""
    from hfrecipes.planning import plan_stage as plan

    args, _ = checked_stage_args(stage, recipe, cli_args, **overrides)
    return plan(stage, args, utilisation=utilisation)[0]


def run_stage(
    stage: str,
    recipe: str | Path | None,
    cli_args: list[str] | None = None,
    *,
    plan: dict[str, Any] | None = None,
    **overrides,
) -> StageResult:
    """Run one stage from a recipe (a path or a bundled name) with keyword overrides of any recipe key. The stage is
    planned first (`hfrecipes.planning`), unless `plan` is the plan made for it (a lifecycle plans every stage before
    the first runs), and its record keeps the plan beside what it measured."""
    from hfrecipes import engines, hub

    engines.check_environment()
    engines.fsdp_on_cpu()
    args, resolved = checked_stage_args(stage, recipe, cli_args, **overrides)
    _convert_gguf(stage, args)
    plan = plan or _plan_or_none(stage, args)
    push_to = hub.take_over_push(*args)
    output_dir, rec = get_stage(stage).run(*args, recipe=resolved)
    main = all(getattr(a, "process_index", 0) == 0 for a in args)
    if main and plan is not None:
        rec = _keep_plan(Path(output_dir), rec, plan)
    if push_to and main:
        hub.push(output_dir, **push_to)
        rec = read_record(output_dir)
    return StageResult(Path(output_dir), rec)


def _plan_or_none(stage: str, args) -> dict[str, Any] | None:
    """The stage's plan before it runs; a plan that fails is left out of the record with a warning, and the stage
    runs. Bad input is the stage's to refuse, in its own order and words (its data checks come before any model
    file is read), so a plan that trips over it first says nothing of its own."""
    from hfrecipes.planning import plan_stage as make_plan

    try:
        return make_plan(stage, args, in_run=True)[0]
    except Exception as e:  # the plan is an estimate beside the run; training goes ahead without it
        logger.warning(
            "the %s stage could not be planned (%s: %s); its record has no plan", stage, type(e).__name__, e
        )
        return None


def _keep_plan(output_dir: Path, rec: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """The finished record with its plan block, and the card that puts plan and measurement side by side."""
    from hfrecipes.record import write_record
    from hfrecipes.report.card import write_card

    rec = {**rec, "plan": plan}
    write_record(output_dir, rec)
    write_card(output_dir, rec, plots=False)
    return rec


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

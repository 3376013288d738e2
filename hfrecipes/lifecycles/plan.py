"""A lifecycle planned before anything trains: every stage's plan (`hfrecipes.planning`) in order, each later stage
planned from its parent's planned model (the parent's folder does not exist yet), the honest control's steps from
the planned FLOPs (or time) it is to match, and the totals. Nothing is trained, loaded as weights or written.

    hfrecipes lifecycle tiny/lifecycle --plan

A run plans first too, writes the plan to `plan.json` in the run folder and hands each stage its plan, which its
record keeps (`plan` block) beside what it measured.
"""

from __future__ import annotations

from typing import Any

from hfrecipes.errors import UsageError
from hfrecipes.lifecycles.spec import Lifecycle, StageSpec
from hfrecipes.planning import Model, folder_key, plan_stage, totals
from hfrecipes.runner import checked_stage_args

PLAN = "plan.json"


def _plan(life: Lifecycle, spec: StageSpec, models: dict[str, Model], utilisation: float | None):
    folders = tuple(str(life.root / s.id) for s in life.stages)  # written by the stages before it
    try:
        args, _ = checked_stage_args(spec.stage, spec.recipe, planned=folders, **life.stage_kwargs(spec))
        return plan_stage(spec.stage, args, models, utilisation)
    except UsageError as e:
        raise UsageError(f"{life.source}: planning '{spec.id}' ({spec.stage}): {e}") from None


def plan(life: Lifecycle, utilisation: float | None = None) -> dict[str, Any]:
    """Every stage's plan, the control's, and the stages' totals (the control left out, as in the summary)."""
    models: dict[str, Model] = {}
    stages = []
    for spec in life.stages:
        planned, model = _plan(life, spec, models, utilisation)
        models[folder_key(life.root / spec.id)] = model
        stages.append({"id": spec.id, **planned})
    control = None
    if life.control:
        c = life.control
        by_id = {p["id"]: p for p in stages}
        key = "flops" if c.budget == "flops" else "seconds"
        parent, matched = by_id[c.parent], by_id[c.matches]
        per_step = parent[key] / parent["steps"] if parent["steps"] else 0.0
        steps = max(1, round(matched[key] / per_step)) if per_step > 0 else 1
        control = {"id": c.id, **_plan(life, c.as_stage(steps), models, utilisation)[0]}
        control["steps_source"] = f"the planned {'FLOPs' if key == 'flops' else 'time'} of '{c.matches}' matched"
    first = stages[0]
    return {
        "estimate": True,
        "name": life.name,
        "recipe": life.source,
        "run_dir": str(life.root),
        "matmul": first["matmul"],
        "matmul_flops_per_second": first["matmul_flops_per_second"],
        "utilisation": first["utilisation"],
        "utilisation_source": first["utilisation_source"],
        "stages": stages,
        "control": control,
        "total": totals(stages),
    }


def write(life: Lifecycle) -> dict[str, dict[str, Any]]:
    """A run's plan, made before its first stage: `plan.json` in the run folder, and the stages' plans by id for
    their records. A plan that fails on anything but bad input (which the run would refuse too) leaves the stages to
    plan themselves, with a warning; the run goes on."""
    import json
    import logging

    from hfrecipes.record import atomic_write_text

    try:
        planned = plan(life)
    except UsageError:
        raise
    except Exception as e:  # the plan is an estimate beside the run; training goes ahead without it
        logging.getLogger(__name__).warning(
            "[%s] no plan.json: planning failed (%s: %s)", life.name, type(e).__name__, e
        )
        return {}
    atomic_write_text(life.root / PLAN, json.dumps(planned, indent=2, default=str) + "\n")
    return {p["id"]: p for p in planned["stages"]}

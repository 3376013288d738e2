"""The Python API: every CLI command as a function. `hfrecipes.pretrain("tiny/pretrain", max_steps=50)`; one function a
registered stage (`hfrecipes.stages.STAGES`), made here from the registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfrecipes.errors import UsageError
from hfrecipes.runner import StageResult, parse_stage_args, run_stage
from hfrecipes.stages import STAGES, describe

if TYPE_CHECKING:
    from hfrecipes.serving import Server

__all__ = ["StageResult", "parse_stage_args", "run_stage", *STAGES]  # the runner is part of the API too


def _stage_function(stage_id: str):
    """`hfrecipes.<stage>(recipe="tiny/<stage>", **overrides)`: the stage's CLI command as a function; overrides are
    recipe keys, as flags on the command line."""

    def run(recipe: str | Path = f"tiny/{stage_id}", **overrides) -> StageResult:
        return run_stage(stage_id, recipe, **overrides)

    run.__name__ = run.__qualname__ = stage_id
    run.__doc__ = f"{describe(stage_id)} Runs the `{stage_id}` stage: see `hfrecipes {stage_id} --help` for its keys."
    return run


# One function a registered stage: hfrecipes.sft("tiny/sft", max_steps=5) runs `hfrecipes sft --config tiny/sft
# --max_steps 5`.
globals().update({stage_id: _stage_function(stage_id) for stage_id in STAGES})


def cost(params: float, tokens: float, device: str = "h100", **options) -> dict[str, Any]:
    """Plan a run before it happens: training FLOPs, device-hours, dollars, energy, CO2, serving cost, break-even.

    Options are those of `hfrecipes.costs.plan` (num_devices, mfu, price_per_hour, daily_tokens, ...).
    """
    from hfrecipes.costs import plan

    return plan(params, tokens, device, **options)


def plan(
    stage: str, recipe: str | Path | None = None, utilisation: float | None = None, **overrides
) -> dict[str, Any]:
    """A stage planned before it runs, as `hfrecipes <stage> --config RECIPE --plan` prints it: N, tokens, FLOPs,
    time on this machine (its measured matmul rate x `utilisation`), dollars, energy and CO2, each an estimate, with
    no weights loaded and nothing written (see `hfrecipes.planning`). Overrides are recipe keys."""
    from hfrecipes.runner import plan_stage

    return plan_stage(stage, recipe or f"tiny/{stage}", utilisation=utilisation, **overrides)


def push(folder: str | Path, repo_id: str, private: bool | None = None) -> dict[str, Any]:
    """Upload a finished stage folder to the Hub; the token comes from HF_TOKEN or `hf auth login`."""
    from hfrecipes.hub import push as push_folder

    return push_folder(folder, repo_id, private=private)


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The stage record (`record.json`) of a stage folder."""
    from hfrecipes.record import read_record as read

    return read(folder)


def lifecycle(
    recipe: str | Path = "tiny/lifecycle",
    run_dir: str | Path | None = None,
    force: tuple[str, ...] | list[str] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
    seeds: int = 1,
    plan: bool = False,
    plan_utilisation: float | None = None,
) -> dict[str, Any]:
    """Run or resume a whole lifecycle (stages, control, export, inference); returns its summary.

    `overrides` maps a stage id, or `*` for every stage, to recipe keys: `{"*": {"max_steps": 5}}`. `seeds` > 1
    runs it once per seed (every stage's seed raised by 1, 2, ...) and summarises the spread. `plan=True` trains
    nothing: it returns every stage's plan and their totals (`hfrecipes.lifecycles.plan`), with the matmul rate
    measured here times `plan_utilisation` (default: the device kind's), and writes nothing.
    """
    if plan:
        from hfrecipes.lifecycles.plan import plan as plan_lifecycle
        from hfrecipes.lifecycles.spec import load

        return plan_lifecycle(load(recipe, run_dir, overrides, force), plan_utilisation)
    if plan_utilisation is not None:
        raise UsageError("plan_utilisation (--plan-utilisation) sets the utilisation of a plan: use it with plan.")
    from hfrecipes.lifecycles.runner import run

    return run(recipe, run_dir=run_dir, force=tuple(force), overrides=overrides, seeds=seeds)


def recipes() -> list[str]:
    """The bundled recipe names."""
    from hfrecipes.recipe import list_recipes

    return list_recipes()


def export(stage_dir: str | Path, out_dir: str | Path, **kwargs) -> StageResult:
    """Merge adapters and write a folder vLLM serves as is, or with `format="gguf"` one GGUF file for llama.cpp and
    Ollama; verify it (see `hfrecipes.exporting.export`)."""
    from hfrecipes.exporting import export as _export

    out, rec = _export(stage_dir, out_dir, **kwargs)
    return StageResult(Path(out), rec)


def convert(gguf: str | Path, out_dir: str | Path, **kwargs) -> StageResult:
    """Dequantize a GGUF file into a model folder with its base record (see `hfrecipes.converting.convert`)."""
    from hfrecipes.converting import convert as _convert
    from hfrecipes.record import read_record as _read

    out = _convert(gguf, out_dir, **kwargs)
    return StageResult(Path(out), _read(out))


def generate(model_dir: str | Path, prompts, out: str | Path | None = None, **kwargs):
    """Batched generation with vLLM (when installed) or transformers; returns (rows, stats). With `record_stats`
    (the default) the stats join the folder's record and its card is re-rendered with the measured serving cost (see
    `hfrecipes.inference.generate`)."""
    from hfrecipes.inference import generate as _generate
    from hfrecipes.report.card import refresh_card

    rows, stats = _generate(model_dir, prompts, out, **kwargs)
    if kwargs.get("record_stats", True):
        refresh_card(model_dir)
    return rows, stats


def evaluate(model_dir: str | Path, tasks: list[str] | str = (), **kwargs) -> dict[str, Any]:
    """Score a model folder with lm-evaluation-harness (`hfrecipes eval`): bundled tasks offline, any lm-eval task,
    the contamination check against the lineage's training data and, with `probe=`, the knowledge probe month by
    month. The results join the folder's record and its card is drawn again (see `hfrecipes.harness.evaluate`)."""
    from hfrecipes.harness import evaluate as _evaluate
    from hfrecipes.report.card import refresh_card

    block = _evaluate(model_dir, list(tasks) if not isinstance(tasks, str) else tasks, **kwargs)
    if kwargs.get("write", True):
        refresh_card(model_dir)
    return block


def serve(folder: str | Path, port: int = 8000, host: str = "127.0.0.1", wait: bool = True, **kwargs) -> Server:
    """Start vLLM's OpenAI-compatible server on an export folder; returns its handle: `.url` (the API's base for an
    OpenAI client), `.model`, `.stop()`, and a context manager that stops it (see `hfrecipes.serving.serve`)."""
    from hfrecipes.serving import serve as _serve

    return _serve(folder, port=port, host=host, wait=wait, **kwargs)

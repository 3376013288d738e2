"""The lifecycle recipe as dataclasses, checked in full before anything runs: its own keys by the strict checker the
stage recipes use (unknown keys are errors with a did-you-mean, wrong types name the field and the file), the
references between its blocks, and every stage recipe with its overrides, the control's included.

    hfrecipes check tiny/lifecycle
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfrecipes.errors import UsageError
from hfrecipes.recipe import check_values, load_yaml, resolve_recipe
from hfrecipes.stages import STAGES, facts

EXPORT = "export"  # the export folder in the run folder, and the name `--force export` reruns it by
EVERY_STAGE = "*"  # the overrides key that sets a recipe key on every stage
STAGE_REF = re.compile(r"\{[\w.-]+\}")  # a `--set` value that is a `{id}` placeholder


def _placeholder(value: Any) -> str | None:
    """The stage id of a `{id}` override value (the folder of that stage in this run), else None."""
    if isinstance(value, str) and len(value) > 2 and value.startswith("{") and value.endswith("}"):
        return value[1:-1]
    return None


@dataclass
class StageSpec:
    """One stage of the lifecycle: its folder in the run folder is `id`; it starts from `parent`'s folder."""

    stage: str = field(metadata={"choices": tuple(STAGES), "help": "the stage to run"})
    recipe: str = field(metadata={"help": "the stage's recipe: a bundled name or a YAML path"})
    id: str | None = field(default=None, metadata={"help": "folder name in the run folder (default: the stage)"})
    parent: str | None = field(default=None, metadata={"help": "id of an earlier stage whose folder it starts from"})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "recipe keys set on top; a value '{id}' is that stage's folder"}
    )

    def refs(self) -> set[str]:
        """Stage ids this one reads: its parent and any `{id}` placeholder in its overrides."""
        found = {self.parent} if self.parent else set()
        return found | {ref for v in self.overrides.values() if (ref := _placeholder(v))}


@dataclass
class EvaluationSpec:
    """Held-out task accuracy after every causal-LM stage: greedy replies scored by an `evaluate` metric."""

    dataset_name: str | None = field(default=None, metadata={"help": "unset: no held-out evaluation"})
    dataset_config: str | None = None
    split: str = "test"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    metric: str = "answer_accuracy"
    max_new_tokens: int = 32
    samples: int | None = field(default=None, metadata={"help": "evaluate on the first N rows only"})
    group_column: str | None = field(
        default=None, metadata={"help": "a column of kinds of problem (e.g. `kind`): accuracy also by kind"}
    )


@dataclass
class ExportSpec:
    """Export of the candidate with the best held-out accuracy to `<run_dir>/export`."""

    candidates: list[str] = field(metadata={"help": "ids of the stages to choose the exported model from"})
    dtype: str = "auto"


@dataclass
class InferenceSpec:
    """Batched generation by the exported model on the evaluation split's prompts."""

    max_new_tokens: int = 32
    samples: int | None = field(default=None, metadata={"help": "the first N prompts only"})
    engine: str = "auto"


@dataclass
class ControlSpec:
    """The honest control: `parent` trained further with `recipe`, for as many steps as spend the training FLOPs
    (6·N·D) stage `match_flops_of` spent, at `parent`'s FLOPs per step; or, with `match_wall_time_of`, as many as
    fill that stage's wall time at `parent`'s time per step. Exactly one of the two is set."""

    id: str
    recipe: str
    parent: str
    match_flops_of: str | None = field(default=None, metadata={"help": "a stage id whose training FLOPs to spend"})
    match_wall_time_of: str | None = field(default=None, metadata={"help": "a stage id whose wall time to fill"})
    stage: str = field(default="sft", metadata={"choices": tuple(STAGES)})
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def matches(self) -> str:
        return self.match_flops_of or self.match_wall_time_of

    @property
    def budget(self) -> str:
        return "flops" if self.match_flops_of else "wall_time"

    def as_stage(self, max_steps: int) -> StageSpec:
        return StageSpec(
            stage=self.stage,
            recipe=self.recipe,
            id=self.id,
            parent=self.parent,
            overrides={**self.overrides, "max_steps": max_steps},
        )


@dataclass
class ClaimsSpec:
    """What the summary checks this run against: one line per claim saying whether the numbers support it. A claim
    whose stages are unset is not checked."""

    ceiling: str | None = field(default=None, metadata={"help": "the SFT stage whose accuracy is the ceiling"})
    rl: list[str] = field(default_factory=list, metadata={"help": "RL stages expected to pass the ceiling"})
    rl_margin: float = field(default=0.15, metadata={"help": "the best RL stage's lead over the ceiling"})
    control_margin: float = field(default=0.10, metadata={"help": "the best RL stage's lead over the control"})
    flaw_group: str | None = field(default=None, metadata={"help": "the kind of problem the demonstrations get wrong"})
    clean_group: str | None = field(default=None, metadata={"help": "the kind they get right"})
    flaw_margin: float = field(default=0.20, metadata={"help": "how far below the clean kind the flawed one stays"})
    dpo: str | None = field(default=None, metadata={"help": "the DPO stage, compared with reward model + PPO"})
    rlhf: list[str] = field(default_factory=list, metadata={"help": "the reward-model and PPO stages beside it"})
    hacking: str | None = field(default=None, metadata={"help": "the stage whose gold check should catch hacking"})
    cutoff: str | None = field(default=None, metadata={"help": "the stage whose knowledge probe shows the cutoff"})

    def ids(self) -> list[str]:
        one = [self.ceiling, self.dpo, self.hacking, self.cutoff]
        return [i for i in one if i] + list(self.rl) + list(self.rlhf)


SEEDS_DIR = "seeds"  # where `--seeds N` runs every seed after the first: <run_dir>/seeds/<seed>/


@dataclass
class Lifecycle:
    """A lifecycle recipe, checked; `run_dir` and `name` are filled in and every override is merged by `load`."""

    stages: list[StageSpec]
    name: str | None = None
    run_dir: str | None = field(default=None, metadata={"help": "default: runs/<name>"})
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    export: ExportSpec | None = None
    inference: InferenceSpec | None = None
    control: ControlSpec | None = None
    claims: ClaimsSpec | None = None
    source: str = field(default="", init=False)  # the recipe file, for messages and the summary

    @property
    def root(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def stage_kwargs(self, spec: StageSpec) -> dict[str, Any]:
        """The stage's recipe overrides with folders filled in: `{id}` placeholders, output_dir, model_name_or_path."""
        kw = {k: str(self.root / ref) if (ref := _placeholder(v)) else v for k, v in spec.overrides.items()}
        kw["output_dir"] = str(self.root / spec.id)
        if spec.parent:
            kw["model_name_or_path"] = str(self.root / spec.parent)
        return kw


# ----------------------------------------------------------------------------------------------------- checks


def _block(cls, raw: Any, where: str):
    """One block of the recipe as its dataclass: keys and value types by the stage recipes' strict checker."""
    if not isinstance(raw, dict):
        names = ", ".join(f.name for f in dataclasses.fields(cls) if f.init)
        raise UsageError(f"{where}: expected a mapping with keys among {names}, got {type(raw).__name__}.")
    values = check_values(raw, (cls,), where)
    for f in dataclasses.fields(cls):
        required = f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise UsageError(f"{where}: '{f.name}' is missing ({f.metadata.get('help', 'required')}).")
    return cls(**values)


def _positive(value: int | None, where: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{where} has value {value!r}, expected an integer >= 1.")


def _one_of(value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise UsageError(f"{where} has value {value!r}, expected one of {list(allowed)}.")


def _id(value: str, where: str, taken: set[str]) -> None:
    if value in taken:
        raise UsageError(f"{where}: id '{value}' is used twice; every stage and the control need their own.")
    if value in (EXPORT, EVERY_STAGE, SEEDS_DIR) or Path(value).name != value or value in (".", ".."):
        raise UsageError(
            f"{where}: id '{value}' cannot name a stage folder; use a plain name other than 'export' and 'seeds'."
        )


def _extra_overrides(extra: Any, known: set[str], src: str) -> dict[str, dict[str, Any]]:
    extra = dict(extra or {})
    unknown = sorted(set(extra) - known - {EVERY_STAGE})
    if unknown:
        raise UsageError(
            f"overrides (--set) name stage(s) {unknown} that '{src}' does not have; its stages are "
            f"{', '.join(sorted(known))}, or '*' for every stage."
        )
    for key, value in extra.items():
        if not isinstance(value, dict):
            raise UsageError(f"overrides['{key}']: expected a mapping of recipe keys to values, got {value!r}.")
    return extra


def load(
    recipe: str | Path = "tiny/lifecycle",
    run_dir: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    force: tuple[str, ...] | list[str] = (),
) -> Lifecycle:
    """Parse and check a lifecycle recipe, every stage recipe with its overrides included; runs nothing.

    `overrides` maps a stage id (or `*` for every stage) to recipe keys, applied after the lifecycle's own;
    `force` names the stages (or `export`) a run would redo, checked here so a typo stops before any training.
    """
    from hfrecipes.runner import parse_stage_args

    path = resolve_recipe(recipe)
    src = str(path)
    raw = load_yaml(path)
    top = check_values(raw, (Lifecycle,), src)
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise UsageError(f"{src}: 'stages' is missing or empty; list the stages to run, each with stage and recipe.")

    stages: list[StageSpec] = []
    for i, item in enumerate(raw["stages"]):
        spec = _block(StageSpec, item, f"{src}: stages[{i}]")
        spec.id = spec.id or spec.stage
        _id(spec.id, f"{src}: stages[{i}]", {s.id for s in stages})
        stages.append(spec)
    ids = [s.id for s in stages]

    control = None
    if raw.get("control") is not None:
        control = _block(ControlSpec, raw["control"], f"{src}: control")
    if control:
        _id(control.id, f"{src}: control", set(ids))
        if (control.match_flops_of is None) == (control.match_wall_time_of is None):
            raise UsageError(
                f"{src}: control: set exactly one of match_flops_of (the same training FLOPs) and "
                "match_wall_time_of (the same wall time), naming the stage to match."
            )
        for key in ("parent", "match_flops_of", "match_wall_time_of"):
            value = getattr(control, key)
            if value is not None and value not in ids:
                raise UsageError(f"{src}: control: {key} '{value}' is not a stage id ({', '.join(ids)}).")

    extra = _extra_overrides(overrides, set(ids) | ({control.id} if control else set()), src)
    for spec in stages + ([control] if control else []):
        spec.overrides = {**spec.overrides, **extra.get(EVERY_STAGE, {}), **extra.get(spec.id, {})}
    for i, spec in enumerate(stages):  # placeholders checked after the overrides are merged: --set can add them
        missing = spec.refs() - set(ids[:i])
        if missing:
            raise UsageError(
                f"{src}: stages[{i}]: '{spec.id}' refers to {sorted(missing)}, which no earlier stage defines."
            )
    if control and (missing := {_placeholder(v) for v in control.overrides.values()} - {None} - set(ids)):
        raise UsageError(f"{src}: control: its overrides refer to {sorted(missing)}, which are not stage ids.")

    evaluation = _block(EvaluationSpec, raw.get("evaluation") or {}, f"{src}: evaluation")
    _positive(evaluation.max_new_tokens, f"{src}: evaluation: max_new_tokens")
    _positive(evaluation.samples, f"{src}: evaluation: samples")

    export = None
    if raw.get("export") is not None:
        export = _block(ExportSpec, raw["export"], f"{src}: export")
        from hfrecipes.exporting import DTYPES

        _one_of(export.dtype, DTYPES, f"{src}: export: dtype")
        if not export.candidates:
            raise UsageError(f"{src}: export: 'candidates' is empty; list the stage ids to choose the export from.")
        exportable = [s.id for s in stages if facts(s.stage).scored]
        bad = [c for c in export.candidates if c not in exportable]
        if bad:
            raise UsageError(
                f"{src}: export: candidates {bad} are not ids of causal-LM stages of this lifecycle "
                f"({', '.join(exportable)})."
            )
        if len(set(export.candidates)) > 1 and not evaluation.dataset_name:
            raise UsageError(
                f"{src}: export: the best of several candidates is chosen by held-out accuracy, but 'evaluation' "
                "has no dataset_name; set one, or name a single candidate."
            )

    inference = None
    if raw.get("inference") is not None:
        inference = _block(InferenceSpec, raw["inference"], f"{src}: inference")
    if inference is not None:
        from hfrecipes.inference import ENGINES

        _one_of(inference.engine, ENGINES, f"{src}: inference: engine")
        _positive(inference.max_new_tokens, f"{src}: inference: max_new_tokens")
        _positive(inference.samples, f"{src}: inference: samples")
        if export is None:
            raise UsageError(f"{src}: inference serves the exported model; add an 'export' block with candidates.")
        if not evaluation.dataset_name:
            raise UsageError(f"{src}: inference answers the evaluation split's prompts; set evaluation: dataset_name.")

    claims = None
    if raw.get("claims") is not None:
        claims = _block(ClaimsSpec, raw["claims"], f"{src}: claims")
        all_ids = set(ids) | ({control.id} if control else set())
        bad = [i for i in claims.ids() if i not in all_ids]
        if bad:
            raise UsageError(f"{src}: claims: {bad} are not stage ids of this lifecycle ({', '.join(ids)}).")
        if (claims.flaw_group or claims.clean_group) and not evaluation.group_column:
            raise UsageError(
                f"{src}: claims: flaw_group and clean_group are kinds of problem, but 'evaluation' has no "
                "group_column; set one (e.g. kind)."
            )

    known = set(ids) | ({control.id} if control else set()) | ({EXPORT} if export else set())
    bad = [f for f in force if f not in known]
    if bad:
        raise UsageError(f"--force names {bad}, not stages of this lifecycle ({', '.join(sorted(known))}).")

    name = top.get("name") or path.stem
    life = Lifecycle(
        stages=stages,
        name=name,
        run_dir=str(run_dir or top.get("run_dir") or f"runs/{name}"),
        evaluation=evaluation,
        export=export,
        inference=inference,
        control=control,
        claims=claims,
    )
    life.source = src
    # every stage recipe parses strictly with its final overrides; the control's step count is set when it runs
    checked = [(f"stages[{i}]", s) for i, s in enumerate(stages)] + (
        [("control", control.as_stage(1))] if control else []
    )
    for where, spec in checked:
        try:
            parse_stage_args(spec.stage, spec.recipe, **life.stage_kwargs(spec))
        except UsageError as e:
            raise UsageError(f"{src}: {where} ('{spec.id}', {spec.stage}): {e}") from None
    return life


def parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    """`--set sft.max_steps=100 --set '*.logging_steps=5'` -> {"sft": {"max_steps": 100}, "*": {...}} (YAML values;
    `--set ppo.reward_model_path={reward}` keeps the placeholder of the reward stage's folder)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, eq, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not eq or not dot or not name or not stage:
            raise UsageError(f"--set '{item}': expected STAGE.KEY=VALUE (STAGE may be '*').")
        if STAGE_REF.fullmatch(value):  # `{reward}` names a stage's folder, where YAML would read a mapping
            out.setdefault(stage, {})[name] = value
            continue
        try:
            out.setdefault(stage, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--set '{item}': the value is not valid YAML.") from None
    return copy.deepcopy(out)

"""The lifecycle recipe as dataclasses, checked in full before anything runs: its own keys by the strict checker the
stage recipes use (unknown keys are errors with a did-you-mean, wrong types name the field and the file), each
field's bounds and the stage ids it must name by its metadata, the rules between blocks by the `RULES` and `NEEDS`
tables, the claims (`claims.KINDS`) with the placeholders of their text, and every stage recipe with its overrides,
the control's included.

    hfrecipes check tiny/lifecycle
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfrecipes.errors import UsageError
from hfrecipes.lifecycles.claims import KINDS, Claim, kind_of
from hfrecipes.recipe import NULL_WORDS, check_values, load_yaml, resolve_recipe
from hfrecipes.stages import STAGES, facts

EXPORT = "export"  # the export folder in the run folder, and the name `--force export` reruns it by
SERVED = "served"  # <run_dir>/served/<id>: the teacher and the student exported to be served side by side
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
    max_new_tokens: int = field(default=32, metadata={"range": (1, None)})
    samples: int | None = field(
        default=None, metadata={"range": (1, None), "help": "evaluate on the first N rows only"}
    )
    group_column: str | None = field(
        default=None, metadata={"help": "a column of kinds of problem (e.g. `kind`): accuracy also by kind"}
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={"help": "lm-eval tasks scored after every scored stage too (`hfrecipes eval`), e.g. [tiny_facts]"},
    )
    task_limit: int | None = field(
        default=None, metadata={"range": (1, None), "help": "score the first N documents of each task only"}
    )
    task_engine: str = field(default="auto", metadata={"one_of": ("hfrecipes.harness", "ENGINES")})


@dataclass
class ExportSpec:
    """Export of the candidate with the best held-out accuracy to `<run_dir>/export`."""

    candidates: list[str] = field(
        metadata={"refs": "scored", "min_items": 1, "help": "the ids of the stages to choose the exported model from"}
    )
    dtype: str = field(default="auto", metadata={"one_of": ("hfrecipes.exporting", "DTYPES")})


@dataclass
class InferenceSpec:
    """Batched generation by the exported model on the evaluation split's prompts."""

    max_new_tokens: int = field(default=32, metadata={"range": (1, None)})
    samples: int | None = field(default=None, metadata={"range": (1, None), "help": "the first N prompts only"})
    engine: str = field(default="auto", metadata={"one_of": ("hfrecipes.inference", "ENGINES")})


@dataclass
class DistillationSpec:
    """Serve the teacher and the student distilled from it with the same engine on the evaluation split's prompts
    (each exported to `<run_dir>/served/<id>`); the stages that made the student, its own pretraining included,
    are what distillation cost, and the saving per request says after how much traffic it has paid for itself."""

    teacher: str = field(metadata={"refs": "scored", "help": "the id of the stage the student learned from"})
    student: str = field(metadata={"refs": "scored", "help": "the id of the distillation stage"})
    cost_of: list[str] = field(
        metadata={"refs": "stage", "min_items": 1, "help": "the ids of the stages that made the student"}
    )


@dataclass
class ControlSpec:
    """The honest control: `parent` trained further with `recipe`, for as many steps as spend the training FLOPs
    (6·N·D) stage `match_flops_of` spent, at `parent`'s FLOPs per step; or, with `match_wall_time_of`, as many as
    fill that stage's wall time at `parent`'s time per step. Exactly one of the two is set."""

    id: str
    recipe: str
    parent: str = field(metadata={"refs": "stage"})
    match_flops_of: str | None = field(
        default=None, metadata={"refs": "stage", "help": "a stage id whose training FLOPs to spend"}
    )
    match_wall_time_of: str | None = field(
        default=None, metadata={"refs": "stage", "help": "a stage id whose wall time to fill"}
    )
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
    distillation: DistillationSpec | None = None
    claims: list[Claim] = field(default_factory=list, metadata={"help": "what the summary checks: kind, key, text"})
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

# The ids a field's `refs` metadata names, as its message calls one of them and several (`load` lists them).
REFS = {
    "stage": ("a stage id", "stage ids of this lifecycle"),
    "scored": ("the id of a causal-LM stage", "ids of causal-LM stages of this lifecycle"),
    "any": ("a stage id", "stage ids of this lifecycle"),
}

# Rules between blocks: (broken by this lifecycle?, the message after the file's name).
RULES = (
    (
        lambda life: (
            life.control and (life.control.match_flops_of is None) == (life.control.match_wall_time_of is None)
        ),
        "control: set exactly one of match_flops_of (the same training FLOPs) and match_wall_time_of (the same wall "
        "time), naming the stage to match.",
    ),
    (
        lambda life: life.export and len(set(life.export.candidates)) > 1 and not life.evaluation.dataset_name,
        "export: the best of several candidates is chosen by held-out accuracy, but 'evaluation' has no dataset_name; "
        "set one, or name a single candidate.",
    ),
    (
        lambda life: life.inference and not life.export and not life.distillation,
        "inference serves the exported model; add an 'export' block with candidates.",
    ),
    (
        lambda life: life.inference and not life.evaluation.dataset_name,
        "inference answers the evaluation split's prompts; set evaluation: dataset_name.",
    ),
    (
        lambda life: life.distillation and not life.inference,
        "distillation serves the teacher and the student as inference does; add an 'inference' block (its engine, "
        "max_new_tokens and samples apply to both).",
    ),
    (
        lambda life: life.distillation and life.distillation.student not in life.distillation.cost_of,
        "distillation: cost_of must include the student's own stage (the distillation itself).",
    ),
)

# What a claim kind's `NEEDS` names: (present in this lifecycle?, the message after the claim's place).
NEEDS = {
    "heldout": (
        lambda life: life.evaluation.dataset_name,
        "it compares held-out accuracy, but 'evaluation' has no dataset_name; set one.",
    ),
    "group_column": (
        lambda life: life.evaluation.group_column,
        "it compares kinds of problem, but 'evaluation' has no group_column; set one (e.g. kind).",
    ),
    "control": (lambda life: life.control, "it reads the honest control, but there is no 'control' block; add one."),
    "inference": (
        lambda life: life.inference,
        "it reads the export's serving prices, but there is no 'inference' block; add one.",
    ),
    "distillation": (
        lambda life: life.distillation,
        "it reads the teacher's and the student's serving prices, but there is no 'distillation' block; add one.",
    ),
}


def _expected(value: float, low: float | None, high: float | None) -> str:
    kind = "an integer" if isinstance(value, int) else "a number"
    return f"{kind} >= {low}" if high is None else f"{kind} from {low} to {high}"


def _check_field(f: dataclasses.Field, value: Any, where: str, ids: dict[str, Any]) -> None:
    """One field's value against its metadata: `range` (lowest, highest; None is open), `one_of` (a module's tuple,
    imported only for a block that is there), `min_items`, and `refs` (the kind of stage id it names)."""
    meta, name = f.metadata, f.name
    low, high = meta.get("range", (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        raise UsageError(f"{where}: {name} has value {value!r}, expected {_expected(value, low, high)}.")
    if "one_of" in meta:
        module, attr = meta["one_of"]
        allowed = getattr(importlib.import_module(module), attr)
        if value not in allowed:
            raise UsageError(f"{where}: {name} has value {value!r}, expected one of {list(allowed)}.")
    if meta.get("min_items") and not value:
        raise UsageError(f"{where}: '{name}' is empty; list {meta['help']}.")
    if "refs" in meta:
        one, several = REFS[meta["refs"]]
        allowed = ids[meta["refs"]]() if callable(ids[meta["refs"]]) else ids[meta["refs"]]
        if isinstance(value, str) and value not in allowed:
            raise UsageError(f"{where}: {name} '{value}' is not {one} ({', '.join(allowed)}).")
        if isinstance(value, list) and (bad := [v for v in value if v not in allowed]):
            raise UsageError(f"{where}: {name} {bad} are not {several} ({', '.join(allowed)}).")


def _block(cls, raw: Any, where: str, ids: dict[str, Any] | None = None):
    """One block of the recipe as its dataclass: keys and value types by the stage recipes' strict checker, then
    each field by its metadata (`_check_field`)."""
    if not isinstance(raw, dict):
        names = ", ".join(f.name for f in dataclasses.fields(cls) if f.init)
        raise UsageError(f"{where}: expected a mapping with keys among {names}, got {type(raw).__name__}.")
    values = check_values(raw, (cls,), where)
    for f in dataclasses.fields(cls):
        required = f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise UsageError(f"{where}: '{f.name}' is missing ({f.metadata.get('help', 'required')}).")
    block = cls(**values)
    for f in dataclasses.fields(cls):
        if f.init and getattr(block, f.name) is not None:
            _check_field(f, getattr(block, f.name), where, ids or {})
    return block


def _optional(cls, raw: dict[str, Any], key: str, src: str, ids: dict[str, Any]):
    return None if raw.get(key) is None else _block(cls, raw[key], f"{src}: {key}", ids)


def _id(value: str, where: str, taken: set[str]) -> None:
    if value in taken:
        raise UsageError(f"{where}: id '{value}' is used twice; every stage and the control need their own.")
    if value in (EXPORT, SERVED, EVERY_STAGE, SEEDS_DIR) or Path(value).name != value or value in (".", ".."):
        raise UsageError(
            f"{where}: id '{value}' cannot name a stage folder; use a plain name other than 'export', 'served' and "
            "'seeds'."
        )


def _stages(raw: Any, src: str) -> list[StageSpec]:
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{src}: 'stages' is missing or empty; list the stages to run, each with stage and recipe.")
    stages: list[StageSpec] = []
    for i, item in enumerate(raw):
        spec = _block(StageSpec, item, f"{src}: stages[{i}]")
        spec.id = spec.id or spec.stage
        _id(spec.id, f"{src}: stages[{i}]", {s.id for s in stages})
        stages.append(spec)
    return stages


def _text(claim: Claim, where: str) -> None:
    """Each text of the claim formats with the placeholders its kind fills, and with no other."""
    for name, words in claim.WORDS.items():
        text = getattr(claim, name)
        try:
            used = sorted({f for _, f, _, _ in string.Formatter().parse(text) if f is not None} - set(words))
            if not used:
                text.format(**dict.fromkeys(words, ""))
        except (ValueError, IndexError) as e:
            raise UsageError(
                f"{where}: {name} does not format ({e}); write a literal brace twice: {{{{ }}}}."
            ) from None
        if used:
            named = ", ".join(f"{{{w}}}" for w in used)
            raise UsageError(
                f"{where}: {name} has {named}, which this kind does not fill; it fills "
                f"{', '.join(f'{{{w}}}' for w in words)}."
            )


def _claims(raw: Any, src: str, ids: dict[str, Any]) -> list[Claim]:
    """The `claims:` list, each claim as its kind's dataclass (`claims.KINDS`); keys unique, texts formatting."""
    if not isinstance(raw, list):
        raise UsageError(
            f"{src}: claims: expected a list of claims, each a mapping with kind, key and text; "
            f"got {type(raw).__name__}."
        )
    claims: list[Claim] = []
    for i, item in enumerate(raw):
        where = f"{src}: claims[{i}]"
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind not in KINDS:
            close = difflib.get_close_matches(str(kind), list(KINDS), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            got = "'kind' is missing" if kind is None else f"kind {kind!r} is not a claim kind"
            raise UsageError(f"{where}: {got}; expected a mapping with kind, one of {list(KINDS)}.{hint}")
        where = f"{where} ({kind})"
        claim = _block(KINDS[kind], {k: v for k, v in item.items() if k != "kind"}, where, ids)
        _text(claim, where)
        if claim.key in {c.key for c in claims}:
            raise UsageError(f"{where}: key '{claim.key}' is used twice; every claim needs its own.")
        claims.append(claim)
    return claims


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


def _merge_overrides(life: Lifecycle, overrides: Any) -> None:
    """`--set` values over the recipe's own overrides; then every `{id}` placeholder names an earlier stage."""
    stages, control, src = life.stages, life.control, life.source
    ids = [s.id for s in stages]
    extra = _extra_overrides(overrides, set(ids) | ({control.id} if control else set()), src)
    for spec in stages + ([control] if control else []):
        spec.overrides = {**spec.overrides, **extra.get(EVERY_STAGE, {}), **extra.get(spec.id, {})}
    for i, spec in enumerate(stages):
        missing = spec.refs() - set(ids[:i])
        if missing:
            raise UsageError(
                f"{src}: stages[{i}]: '{spec.id}' refers to {sorted(missing)}, which no earlier stage defines."
            )
    if control and (missing := {_placeholder(v) for v in control.overrides.values()} - {None} - set(ids)):
        raise UsageError(f"{src}: control: its overrides refer to {sorted(missing)}, which are not stage ids.")


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
    stages = _stages(raw.get("stages"), src)
    # the stages an export may name: asked only when one is named, as a stage's facts import its module
    ids = {"stage": [s.id for s in stages], "scored": lambda: [s.id for s in stages if facts(s.stage).scored]}
    control = _optional(ControlSpec, raw, "control", src, ids)
    if control:
        _id(control.id, f"{src}: control", set(ids["stage"]))
    ids["any"] = ids["stage"] + ([control.id] if control else [])

    name = top.get("name") or path.stem
    life = Lifecycle(
        stages=stages,
        name=name,
        run_dir=str(run_dir or top.get("run_dir") or f"runs/{name}"),
        evaluation=_block(EvaluationSpec, raw.get("evaluation") or {}, f"{src}: evaluation", ids),
        export=_optional(ExportSpec, raw, "export", src, ids),
        inference=_optional(InferenceSpec, raw, "inference", src, ids),
        control=control,
        distillation=_optional(DistillationSpec, raw, "distillation", src, ids),
        claims=_claims(raw.get("claims") or [], src, ids),
    )
    life.source = src
    for broken, message in RULES:
        if broken(life):
            raise UsageError(f"{src}: {message}")
    for i, claim in enumerate(life.claims):
        for need in claim.NEEDS:
            present, message = NEEDS[need]
            if not present(life):
                raise UsageError(f"{src}: claims[{i}] ({kind_of(claim)}): {message}")
    _merge_overrides(life, overrides)

    known = set(ids["any"]) | ({EXPORT} if life.export else set()) | ({SERVED} if life.distillation else set())
    bad = [f for f in force if f not in known]
    if bad:
        raise UsageError(f"--force names {bad}, not stages of this lifecycle ({', '.join(sorted(known))}).")

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
            out.setdefault(stage, {})[name] = None if value in NULL_WORDS else yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--set '{item}': the value is not valid YAML.") from None
    return copy.deepcopy(out)

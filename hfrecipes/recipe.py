"""YAML recipe -> (ScriptArguments, <Stage>Config, ModelConfig), strictly, plus bundled-recipe lookup.

A recipe is a flat YAML whose keys are field names of the stage's dataclasses. Unknown keys, values of the wrong
type and unknown command-line flags are errors that name the file, the key and the closest valid key; command-line
flags override recipe keys. `hfrecipes recipes` lists the bundled recipes; `tiny/pretrain` resolves to
`recipes/tiny/pretrain.yaml` inside the package or the source tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from hfrecipes.errors import UsageError

PACKAGE_DIR = Path(__file__).resolve().parent
NOT_STAGE_RECIPES = ("accelerate",)


def resource_dir(name: str) -> Path:
    """`recipes/` and `cards/` ship inside the wheel; in a source checkout they sit at the repository root."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


def recipes_root() -> Path:
    return resource_dir("recipes")


def list_recipes() -> list[str]:
    """Bundled recipe names (`tiny/pretrain`, `smollm2-135m-instruct/sft/lora`, ...), sorted."""
    root = recipes_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a bundled recipe."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = recipes_root() / f"{name_or_path}.yaml" if not str(name_or_path).endswith(".yaml") else None
    if bundled is not None and bundled.is_file():
        return bundled
    close = difflib.get_close_matches(str(name_or_path), list_recipes(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else " `hfrecipes recipes` lists the bundled ones."
    raise UsageError(f"recipe '{name_or_path}' not found: it is neither a file nor a bundled recipe.{hint}")


def stage_of_recipe(path: Path) -> str | None:
    """The stage a bundled recipe is for: `tiny/<stage>.yaml` or `<model>/<stage>/<variant>.yaml`."""
    rel = path.resolve().relative_to(recipes_root().resolve())
    if rel.parts[0] in NOT_STAGE_RECIPES:
        return None
    stem = rel.stem.split("_")[0]
    from hfrecipes.stages import STAGES

    if stem in STAGES or stem == "lifecycle":
        return stem
    return rel.parts[-2] if len(rel.parts) >= 2 else None


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UsageError(f"{path}: line {line} is not UTF-8 text. Save the recipe as UTF-8.") from None
    except yaml.YAMLError as e:
        error = " ".join(str(e).split())  # one line: YAML errors span several
        raise UsageError(f"{path}: not valid YAML ({error}). Fix the syntax at the line named.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe is a mapping of field names to values, found a {type(data).__name__}.")
    return data


# ---------------------------------------------------------------------------------------------- type checking


def _type_hints(cls) -> dict[str, Any]:
    hints = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                hints.update(typing.get_type_hints(klass))
            except Exception:  # an annotation that does not resolve: leave that class's fields unchecked
                pass
    return hints


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether `value` fits type `tp`, and the value converted where YAML is loose (`1e-3` is a string in YAML)."""
    if tp is Any or tp is None:
        return True, value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arg in sorted(args, key=lambda a: a is str):  # try str last so "1e-3" becomes a float where allowed
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in args, value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [e.value for e in tp]
        return (value in allowed or isinstance(value, tp)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        item = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            ok, out = _coerce(value, item)  # a single value where a list is expected: a list of one
            return ok, [out]
        outs = []
        for v in value:
            ok, out = _coerce(v, item)
            if not ok:
                return False, value
            outs.append(out)
        return True, outs
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value


# -------------------------------------------------------------------------------------------------- parsing


def _fields(dataclass_types) -> dict[str, tuple[type, dataclasses.Field, Any]]:
    out = {}
    for cls in dataclass_types:
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, (cls, f, hints.get(f.name, Any)))
    return out


def check_values(values: dict[str, Any], dataclass_types, source: str) -> dict[str, Any]:
    """Strict check of recipe keys and value types; returns the values with loose YAML scalars converted."""
    known = _fields(dataclass_types)
    checked = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else " Check the spelling against the stage's config."
            raise UsageError(f"{source}: unknown key '{key}'.{hint}")
        _, f, tp = known[key]
        ok, converted = _coerce(value, tp)
        choices = f.metadata.get("choices")
        if ok and choices and converted is not None and converted not in choices:
            ok = False
        if not ok:
            expected = f"one of {list(choices)}" if choices else _type_name(tp)
            raise UsageError(f"{source}: key '{key}' has value {value!r}, expected {expected}.")
        checked[key] = converted
    check_finite(checked, source)
    return checked


# What to write instead of a non-finite value, where the library has a number that means "off".
FINITE_HINTS = {
    "max_grad_norm": " (0 turns gradient clipping off)",
    "num_train_epochs": " (set max_steps to stop on a step count)",
}


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The first nan or inf in a value (a number, or one inside a list or mapping), and where it sits."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, dict):
        items = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, v in items:
        found = _non_finite(v, where)
        if found:
            return found
    return None


def check_finite(values: dict[str, Any], source: str) -> None:
    """Refuse nan and inf (YAML's `.nan`/`.inf`, the strings "nan"/"inf" a float field converts, `float("nan")` in
    Python): every comparison with nan is false, so range checks pass it and the run fails, or trains on garbage,
    only once the number reaches an optimizer, a scheduler or a sampler."""
    for key, value in values.items():
        found = _non_finite(value, key)
        if found:
            where, bad = found
            hint = FINITE_HINTS.get(key, "")
            raise UsageError(f"{source}: key '{where}' has value {bad!r}, expected a finite number{hint}.")


# Hyperparameters out of range, as (lowest, highest, lowest allowed, highest allowed): the libraries accept many
# of these silently (a negative learning rate trains backwards) or fail deep inside training.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "learning_rate": (0, None, False, True),
    "per_device_train_batch_size": (1, None, True, True),
    "per_device_eval_batch_size": (1, None, True, True),
    "gradient_accumulation_steps": (1, None, True, True),
    "num_train_epochs": (0, None, False, True),
    "warmup_ratio": (0, 1, True, True),
    "warmup_steps": (0, None, True, True),
    "weight_decay": (0, None, True, True),
    "max_grad_norm": (0, None, True, True),
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "adam_epsilon": (0, None, False, True),
    "logging_steps": (0, None, False, True),
    "save_steps": (0, None, False, True),
    "lora_r": (1, None, True, True),
    "lora_alpha": (0, None, False, True),
    "lora_dropout": (0, 1, True, False),
    "beta": (0, None, True, True),
    "temperature": (0, None, False, True),
    "top_p": (0, 1, False, True),
    "num_generations": (2, None, True, True),
    "max_length": (1, None, True, True),
    "max_completion_length": (1, None, True, True),
    "block_size": (2, None, True, True),
    "max_train_samples": (1, None, True, True),
    "max_eval_samples": (1, None, True, True),
    "tokenizer_vocab_size": (32, None, True, True),
}


def check_ranges(values: dict[str, Any], source: str) -> None:
    """Refuse a hyperparameter the user set outside its range, naming the key, the value and the range."""
    for key, (low, high, low_ok, high_ok) in RANGES.items():
        value = values.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        below = low is not None and (value < low or (value == low and not low_ok))
        above = high is not None and (value > high or (value == high and not high_ok))
        if below or above:
            left = "[" if low_ok else "("
            right = "]" if high_ok else ")"
            span = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
            raise UsageError(f"{source}: key '{key}' has value {value!r}, expected a number in {span}.")


def _strict_parser(dataclass_types):
    """HfArgumentParser whose errors are UsageErrors naming the flag, not a usage dump and a SystemExit."""
    from transformers import HfArgumentParser

    class StrictParser(HfArgumentParser):
        def error(self, message):  # argparse calls this on a bad flag value
            raise UsageError(f"command line: {message}.")

    return StrictParser(dataclass_types, allow_abbrev=False)


def parse(
    dataclass_types: tuple[type, ...],
    recipe: str | Path | None = None,
    cli_args: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Build the dataclasses from a recipe, then Python overrides, then command-line flags (last wins).

    Returns the dataclass instances and the resolved recipe: `{"path": ..., "values": {...}}` where values are the
    keys the user set (the recipe file merged with overrides and flags), as recorded in the stage record.
    """
    path = resolve_recipe(recipe) if recipe is not None else None
    source = str(path) if path else "arguments"
    values = check_values(load_yaml(path), dataclass_types, source) if path else {}
    if overrides:
        values.update(check_values(overrides, dataclass_types, "overrides"))

    parser = _strict_parser(dataclass_types)
    known = _fields(dataclass_types)
    parser.set_defaults(**values)
    namespace, remaining = parser.parse_known_args(args=list(cli_args or []))
    unknown = [a for a in remaining if a.startswith("-")]
    if remaining:
        flag = unknown[0] if unknown else remaining[0]
        close = difflib.get_close_matches(flag.lstrip("-").split("=")[0], list(known), n=1, cutoff=0.6)
        hint = f" Did you mean '--{close[0]}'?" if close else ""
        raise UsageError(f"command line: unknown argument '{flag}'.{hint}")
    cli_set = {}
    for arg in cli_args or []:
        name = arg.lstrip("-").split("=")[0].replace("-", "_")
        if arg.startswith("--") and name.startswith("no_") and name[3:] in known:
            name = name[3:]
        if arg.startswith("--") and name in known:
            cli_set[name] = getattr(namespace, name)
    check_finite(cli_set, "command line")
    values.update(cli_set)
    check_ranges(values, source)
    if values.get("hub_token"):
        raise UsageError(
            f"{source}: hub_token is not read from recipes, overrides or flags: the run would save it (record.json, "
            "training_args.bin). Set the HF_TOKEN environment variable or run `hf auth login` instead."
        )

    outputs = []
    ns = vars(namespace)
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in ns.items() if k in names}
        try:
            outputs.append(cls(**kwargs))
        except (ValueError, TypeError) as e:
            raise UsageError(f"{source}: {cls.__name__}: {e}") from None
        # a JSON string (model_init_overrides, generation_kwargs) is parsed by the dataclass, so check what it made
        for k in names & values.keys():
            where = "command line" if k in cli_set else "overrides" if k in (overrides or {}) else source
            check_finite({k: getattr(outputs[-1], k)}, where)
    resolved = {"path": str(path) if path else None, "values": _jsonable(values)}
    return tuple(outputs), resolved


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))

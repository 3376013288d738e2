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
import re
import types
import typing
from collections.abc import Callable
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
        cls, f, tp = known[key]
        ok, converted = _coerce(value, tp)
        choices = f.metadata.get("choices") or _table_choices(cls, key)
        chosen = converted if isinstance(converted, list) else [converted]
        if ok and choices and converted is not None and any(c not in choices for c in chosen):
            ok = False
        if not ok:
            expected = f"one of {list(choices)}" if choices else _type_name(tp)
            if value is None:
                raise UsageError(f"{source}: key '{key}' is null, but it cannot be unset: expected {expected}.")
            raise UsageError(f"{source}: key '{key}' has value {value!r}, expected {expected}.")
        checked[key] = converted
    check_finite(checked, source)
    return checked


def _reporters() -> tuple[str, ...]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ("all", "none", *INTEGRATION_TO_CALLBACK)


def _peft_task_types() -> tuple[str, ...]:
    from peft import TaskType

    return tuple(t.value for t in TaskType)


# The values a library accepts for a key it checks only once a model is loaded or training runs (GRPO's loss at its
# first step, the trainer's report_to, PEFT's task type), by the library class that declares the key (a function:
# the library's own list): refused when parsed instead.
CHOICES: dict[tuple[str, str], tuple[str, ...] | Callable[[], tuple[str, ...]]] = {
    ("TrainingArguments", "report_to"): _reporters,
    ("ModelConfig", "lora_task_type"): _peft_task_types,
    ("GRPOConfig", "loss_type"): ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    ("GRPOConfig", "multi_objective_aggregation"): ("sum_then_normalize", "normalize_then_sum"),
    ("GRPOConfig", "importance_sampling_level"): ("token", "sequence"),
    ("GRPOConfig", "vllm_mode"): ("server", "colocate"),
    ("GRPOConfig", "vllm_model_impl"): ("transformers", "vllm"),
    ("RLOOConfig", "vllm_mode"): ("server", "colocate"),
    ("RLOOConfig", "vllm_model_impl"): ("transformers", "vllm"),
    ("DistillationConfig", "vllm_mode"): ("server", "colocate"),
    ("DistillationConfig", "vllm_model_impl"): ("transformers", "vllm"),
    ("DPOConfig", "f_divergence_type"): ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
}


def _table_choices(cls: type, key: str) -> tuple[str, ...] | None:
    found = next((CHOICES[(c.__name__, key)] for c in cls.__mro__ if (c.__name__, key) in CHOICES), None)
    return found() if callable(found) else found


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


# Numbers out of their range, as (lowest, highest, lowest allowed, highest allowed): the libraries accept many of
# these silently (a negative learning rate trains backwards, a PUE below 1 makes energy from nothing) or fail deep
# inside training. One table for every stage's keys (a key means the same in every stage that has it); a list value
# (loss_weights) is checked item by item.
INF = math.inf
COUNT, POSITIVE, SHARE, PROBABILITY = (
    (1, INF, True, True),
    (0, INF, False, True),
    (0, 1, True, True),
    (0, 1, False, True),
)
NON_NEGATIVE, PORT, SEED = (0, INF, True, True), (1, 65535, True, True), (0, 2**32 - 1, True, True)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    # optimisation
    "learning_rate": POSITIVE,
    "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "eval_accumulation_steps": COUNT,
    "num_train_epochs": POSITIVE,
    "max_steps": (-1, INF, True, True),  # -1: train num_train_epochs
    "warmup_steps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "adam_epsilon": POSITIVE,
    "label_smoothing_factor": (0, 1, True, False),
    "neftune_noise_alpha": POSITIVE,
    "router_aux_loss_coef": NON_NEGATIVE,
    "seed": SEED,
    "data_seed": SEED,
    "tiny_seed": SEED,
    # logging, checkpoints, data loading
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": COUNT,
    "torch_empty_cache_steps": COUNT,
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": COUNT,
    "dataset_num_proc": COUNT,
    "ddp_timeout": POSITIVE,
    "ddp_bucket_cap_mb": POSITIVE,
    "max_train_samples": COUNT,
    "max_eval_samples": COUNT,
    # model, tokenizer, LoRA
    "lora_r": COUNT,
    "lora_alpha": POSITIVE,
    "lora_dropout": (0, 1, True, False),
    "block_size": (2, INF, True, True),
    "max_length": COUNT,
    "tokenizer_vocab_size": (32, INF, True, True),
    # preference losses
    "beta": NON_NEGATIVE,
    "label_smoothing": (0, 0.5, True, False),  # Robust DPO: the chance a preference label is flipped
    "ld_alpha": SHARE,
    "discopop_tau": POSITIVE,
    "loss_weights": NON_NEGATIVE,
    "ref_model_mixup_alpha": SHARE,
    "ref_model_sync_steps": COUNT,
    "precompute_ref_batch_size": COUNT,
    "center_rewards_coefficient": NON_NEGATIVE,
    "desirable_weight": POSITIVE,  # KTO: each kind's losses weighed, to balance unequal numbers of rows
    "undesirable_weight": POSITIVE,
    # generation and RL
    "temperature": POSITIVE,
    "top_p": PROBABILITY,
    "top_k": NON_NEGATIVE,  # 0: off
    "min_p": SHARE,
    "repetition_penalty": POSITIVE,
    "num_generations": (2, INF, True, True),
    "num_generations_eval": COUNT,
    "generation_batch_size": COUNT,
    "steps_per_generation": COUNT,
    "num_iterations": COUNT,
    "max_completion_length": COUNT,
    "max_new_tokens": COUNT,
    "epsilon": POSITIVE,
    "epsilon_high": POSITIVE,
    "delta": POSITIVE,
    "top_entropy_quantile": SHARE,
    "num_completions_to_print": NON_NEGATIVE,
    "eval_samples": COUNT,
    "eval_max_new_tokens": COUNT,
    "vllm_gpu_memory_utilization": PROBABILITY,
    "vllm_tensor_parallel_size": COUNT,
    "vllm_server_port": PORT,
    "vllm_group_port": PORT,
    "vllm_server_timeout": POSITIVE,
    "gamma": SHARE,
    "lam": SHARE,
    "cliprange": POSITIVE,
    "cliprange_value": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "kl_coef": NON_NEGATIVE,
    "target_kl": POSITIVE,
    "kl_horizon": COUNT,
    "num_ppo_epochs": COUNT,
    "num_mini_batches": COUNT,
    "rollout_forward_batch_size": COUNT,
    "heldout_max_prompts": COUNT,
    # the gold check
    "gold_every": COUNT,
    "gold_samples": COUNT,
    "gold_max_new_tokens": COUNT,
    "gold_patience": COUNT,
    "gold_min_steps": NON_NEGATIVE,
    "gold_min_delta": SHARE,
    "gold_min_gold": SHARE,
    "gold_drop": SHARE,
    # cost and CO2
    "device_price_per_hour": NON_NEGATIVE,
    "device_power_watts": POSITIVE,
    "pue": (1, INF, True, True),  # facility energy over IT energy: 1.0 is a data centre that spends nothing on cooling
    "grid_gco2_per_kwh": NON_NEGATIVE,
}


def check_ranges(
    values: dict[str, Any],
    source: str,
    ranges: dict[str, tuple[float, float, bool, bool]] = RANGES,
    name: str = "key '{}'",
) -> None:
    """Refuse a number the user set outside its range, naming the key (or flag: `name` formats it), the value and
    the range."""
    for key, (low, high, low_ok, high_ok) in ranges.items():
        value = values.get(key)
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if not isinstance(item, (int, float)) or isinstance(item, bool):
                continue
            below = item < low or (item == low and not low_ok)
            above = item > high or (item == high and not high_ok)
            if below or above:
                where = name.format(key) if items is not value else name.format(f"{key}[{i}]")
                raise UsageError(
                    f"{source}: {where} has value {item!r}, expected {_span(low, high, low_ok, high_ok)}."
                )


def _span(low: float, high: float, low_ok: bool, high_ok: bool) -> str:
    """The range in words a user reads at a glance, with its interval: 'at least 1 [1, inf]'."""
    interval = f"{'[' if low_ok else '('}{_bound(low)}, {_bound(high)}{']' if high_ok else ')'}"
    if high == INF:
        words = f"a number {'at least' if low_ok else 'above'} {_bound(low)}"
    elif low == -INF:
        words = f"a number {'at most' if high_ok else 'below'} {_bound(high)}"
    else:
        words = f"a number from {_bound(low)} to {_bound(high)}"
    return f"{words} {interval}"


def _bound(x: float) -> str:
    return "inf" if x == INF else "-inf" if x == -INF else str(int(x)) if float(x).is_integer() else f"{x:g}"


# Keys naming a file, folder or dataset the run reads. An output folder that is one of them, lies inside one or holds
# one would change the input as the run writes (metrics, checkpoints), and delete it where the folder is replaced.
INPUTS = (
    "model_name_or_path",
    "tokenizer_name_or_path",
    "model_init_config",
    "dataset_name",
    "knowledge_probe",
    "gold_dataset_name",
    "chat_template_path",
    "reward_model_path",
    "value_model_path",
    "teacher_model_name_or_path",
)
# Keys whose file or folder must exist when the stage starts (a checkpoint to resume from is only ever local; the
# others may be Hub ids, so they must exist where they look like a path: `looks_local`). Missing, a library would
# take the name for a Hub id, or the run would go on without it.
MUST_EXIST = ("resume_from_checkpoint", *INPUTS)
# What a local name looks like where a Hub id is also allowed: a Hub id is `name` or `owner/name`.
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".gguf", ".safetensors", ".jinja", ".yaml")


def looks_local(name: str) -> bool:
    """Whether `name` can only be a local path, not a Hub id (`tiny:` names are neither)."""
    if name.startswith("tiny:"):
        return False
    p = Path(name)
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or p.suffix in LOCAL_SUFFIXES


def check_apart(output: str | Path | None, inputs: dict[str, Any], source: str, out_name: str = "output_dir") -> None:
    """Refuse an output that is an input, lies inside an input folder or holds an input; names that are not local
    paths (Hub ids, `tiny:` datasets) are passed over."""
    if not output:
        return
    out = Path(output).expanduser().resolve()
    for name, value in inputs.items():
        if not isinstance(value, (str, Path)) or not str(value) or not Path(value).expanduser().exists():
            continue
        p = Path(value).expanduser().resolve()
        relation = "is" if out == p else "lies inside" if p in out.parents else "holds" if out in p.parents else None
        if relation:
            raise UsageError(
                f"{source}: {out_name} '{output}' {relation} {name} '{value}': the run would change its own input. "
                f"Set {out_name} outside it."
            )


def check_inputs(values: dict[str, Any], source: str) -> None:
    """Before a stage starts: every key of MUST_EXIST that names a local path names one that exists."""
    for key in MUST_EXIST:
        value = values.get(key)
        if not isinstance(value, str) or not value:
            continue
        if (key == "resume_from_checkpoint" or looks_local(value)) and not Path(value).expanduser().exists():
            raise UsageError(f"{source}: {key} '{value}' does not exist. Check the path, or leave {key} unset.")


# What unsets an optional key on the command line (`--knowledge_probe null`, `--set pre.knowledge_probe=None`): YAML's
# spellings of null, as a recipe writes it, and Python's.
NULL_WORDS = ("null", "Null", "NULL", "~", "None")


def admits_none(tp: Any) -> bool:
    """Whether a field of type `tp` can be unset (None)."""
    if tp is Any or tp is type(None):
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def take_nulls(cli_args: list[str], known: dict[str, tuple[type, dataclasses.Field, Any]]):
    """(the flags less those that unset a key, {key: None} for each): `--key null` and `--key=null` (or None, ~) set
    an optional key to None, as `key: null` does in a recipe; argparse would pass the word on as a string (a dataset
    named 'null') or fail on it as a number. A key that cannot be None is refused by name."""
    kept, nulls = [], {}
    i = 0
    while i < len(cli_args):
        flag, eq, value = cli_args[i].partition("=")
        if not eq:  # `--key null`: the word alone after the flag (`--key null more` is a list holding 'null')
            value = cli_args[i + 1] if i + 1 < len(cli_args) else ""
            if i + 2 < len(cli_args) and not cli_args[i + 2].startswith("-"):
                value = ""
        name = flag[2:].replace("-", "_")
        if not flag.startswith("--") or name not in known or value not in NULL_WORDS:
            kept.append(cli_args[i])
            i += 1
            continue
        tp = known[name][2]
        if not admits_none(tp):
            raise UsageError(
                f"command line: --{name} {value}: '{name}' cannot be unset, it always has a value ({_type_name(tp)})."
            )
        nulls[name] = None
        i += 1 if eq else 2
    return kept, nulls


def strict_parser(dataclass_types):
    """HfArgumentParser whose errors are UsageErrors naming the flag, not a usage dump and a SystemExit; its
    `print_help()` lists every recipe key of the dataclasses."""
    from transformers import HfArgumentParser

    class StrictParser(HfArgumentParser):
        def error(self, message):  # argparse calls this on a bad flag value
            raise UsageError(f"command line: {message}.")

    parser = StrictParser(dataclass_types, allow_abbrev=False)
    for action in parser._actions:  # argparse %-formats help texts, and TRL's quote Jinja ("{% generation %}")
        if action.help:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    return parser


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

    parser = strict_parser(dataclass_types)
    known = _fields(dataclass_types)
    parser.set_defaults(**values)
    cli_args, nulls = take_nulls(list(cli_args or []), known)
    namespace, remaining = parser.parse_known_args(args=cli_args)
    for name in nulls:
        setattr(namespace, name, None)
    unknown = [a for a in remaining if a.startswith("-")]
    if remaining:
        flag = unknown[0] if unknown else remaining[0]
        close = difflib.get_close_matches(flag.lstrip("-").split("=")[0], list(known), n=1, cutoff=0.6)
        hint = f" Did you mean '--{close[0]}'?" if close else ""
        raise UsageError(f"command line: unknown argument '{flag}'.{hint}")
    cli_set = dict(nulls)
    for arg in cli_args:
        name = arg.lstrip("-").split("=")[0].replace("-", "_")
        if arg.startswith("--") and name.startswith("no_") and name[3:] in known:
            name = name[3:]
        if arg.startswith("--") and name in known:
            cli_set[name] = getattr(namespace, name)
    check_values(cli_set, dataclass_types, "command line")  # what argparse does not check: CHOICES, null
    check_finite(cli_set, "command line")
    values.update(cli_set)
    for where, given in (("command line", cli_set), ("overrides", overrides or {}), (source, values)):
        check_ranges({k: values[k] for k in given if k in values}, where)  # named where the value was given
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
    check_apart(ns.get("output_dir"), {k: ns.get(k) for k in INPUTS}, source)
    resolved = {"path": str(path) if path else None, "values": _jsonable(values)}
    return tuple(outputs), resolved


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))

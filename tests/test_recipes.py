"""Every recipe in the tree parses strictly (found recursively), once; the SFT, reward and DPO recipes form the
matrix the docs promise (five real models x three stages x full/LoRA/QLoRA) with their launch command in the header;
strictness errors are clear."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from hfrecipes.api import parse_stage_args
from hfrecipes.errors import UsageError
from hfrecipes.recipe import list_recipes, load_yaml, recipes_root, resolve_recipe, stage_of_recipe
from hfrecipes.stages import STAGES

ALL_YAML = sorted(recipes_root().rglob("*.yaml"))
MODELS = [
    "smollm2-135m-instruct",
    "smollm2-360m-instruct",
    "qwen2.5-0.5b-instruct",
    "qwen2.5-1.5b-instruct",
    "llama-3.2-1b-instruct",
]
FINE_TUNING = ["sft", "reward", "dpo"]
VARIANTS = ["full", "lora", "qlora"]
MATRIX = [f"{m}/{s}/{v}" for m in MODELS for s in FINE_TUNING for v in VARIANTS]
TINY = [
    "tiny/sft", "tiny/sft_lora", "tiny/reward", "tiny/reward_lora", "tiny/dpo", "tiny/dpo_lora", "tiny/kto",
    "tiny/kto_lora",
]  # fmt: skip


@functools.cache
def parsed(path: Path):
    """A stage recipe parsed strictly, once a session: `((script_args, config, model_args), resolved)`. The tests
    below only read what it returns."""
    return parse_stage_args(stage_of_recipe(path), path)


def _path(name: str) -> Path:
    return recipes_root() / f"{name}.yaml"


def test_recipes_are_found_recursively():
    assert ALL_YAML, "no recipes found"
    assert "tiny/pretrain" in list_recipes()
    assert len(list_recipes()) == len(ALL_YAML)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(recipes_root())))
def test_every_recipe_parses(path: Path):
    stage = stage_of_recipe(path)
    if stage is None:  # accelerate launcher configs: YAML mappings with a distributed_type
        assert "distributed_type" in load_yaml(path)
        return
    if stage == "lifecycle":  # the lifecycle and every stage recipe it names, with its overrides
        from hfrecipes.lifecycles.spec import load

        assert load(path).stages
        return
    assert stage in STAGES, f"{path}: stage '{stage}' is not registered"
    (script_args, config, model_args), resolved = parsed(path)
    assert resolved["values"], "empty recipe"
    assert config.output_dir


def test_real_model_matrix_is_complete():
    missing = [name for name in MATRIX if name not in list_recipes()]
    assert not missing, f"missing recipes: {missing}"


@pytest.mark.parametrize("name", MATRIX + TINY)
def test_recipe_header_has_its_launch_command(name):
    header = [line for line in _path(name).read_text().splitlines() if line.startswith("#")]
    assert any(f"hfrecipes {stage_of_recipe(_path(name))} --config {name}" in line for line in header[:8]), header[:8]


@pytest.mark.parametrize("name", MATRIX + TINY)
def test_variant_switches(name):
    """LoRA and QLoRA are recipe switches: full has neither, LoRA has use_peft, QLoRA adds a 4-bit NF4 base."""
    (_, config, model_args), _ = parsed(_path(name))
    variant = name.rsplit("/", 1)[-1].split("_")[-1]
    assert model_args.use_peft == (variant in ("lora", "qlora"))
    assert model_args.load_in_4bit == (variant == "qlora")
    if variant == "qlora":
        assert model_args.bnb_4bit_quant_type == "nf4"
    if model_args.use_peft:
        assert model_args.lora_r > 0 and model_args.lora_alpha > 0 and model_args.lora_target_modules


def test_tiny_recipes_chain_through_runs_folders():
    parents = {"sft": "runs/tiny/pretrain", "reward": "runs/tiny/sft", "dpo": "runs/tiny/sft", "kto": "runs/tiny/sft"}
    for name in TINY:
        (_, config, model_args), _ = parsed(_path(name))
        assert model_args.model_name_or_path == parents[stage_of_recipe(_path(name))]
        assert config.output_dir == f"runs/{name}"


def test_real_recipes_use_the_usual_datasets_and_safe_defaults():
    for name in MATRIX:
        (script_args, config, model_args), _ = parsed(_path(name))
        expected = "HuggingFaceTB/smoltalk" if name.split("/")[1] == "sft" else "trl-lib/ultrafeedback_binarized"
        assert script_args.dataset_name == expected
        assert not model_args.trust_remote_code and not model_args.allow_pickle_weights
        assert config.learning_rate <= (2e-4 if model_args.use_peft else 5e-5)


def test_bundled_name_and_path_resolve_the_same():
    by_name = resolve_recipe("tiny/pretrain")
    assert resolve_recipe(str(by_name)) == by_name


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BAD_RECIPES = [
    # (yaml text, words the message must contain)
    ("dataset_name: tiny:corpus\nlearning_rat: 0.1\n", ["learning_rat", "learning_rate", "r.yaml"]),
    ("dataset_name: tiny:corpus\nmax_steps: ten\n", ["max_steps", "'ten'", "int"]),
    ("dataset_name: tiny:corpus\nuse_peft: maybe\n", ["use_peft", "bool"]),
    ("dataset_name: tiny:corpus\nlr_scheduler_type: 3\n", ["lr_scheduler_type"]),
    ("dataset_name: [tiny:corpus\n", ["not valid YAML"]),
    ("- a\n- b\n", ["mapping", "list"]),
    ("dataset_name: tiny:corpus\nknowledge_cutoff: last spring\n", ["knowledge_cutoff", "YYYY-MM-DD"]),
    ("output_dir: x\n", ["dataset_name"]),
]


@pytest.mark.parametrize("text,words", BAD_RECIPES, ids=[w[0] for _, w in BAD_RECIPES])
def test_bad_recipe_is_one_clear_error(tmp_path, text, words):
    with pytest.raises(UsageError) as e:
        parse_stage_args("pretrain", _write(tmp_path, text))
    assert "\n" not in str(e.value).strip(), "one message, on one line"
    for w in words:
        assert w in str(e.value)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # YAML 1.1 reads `1e-3` as a string; a recipe means a number.
    (_, config, _), _ = parse_stage_args(
        "pretrain", _write(tmp_path, "dataset_name: tiny:corpus\nlearning_rate: 1e-3\n")
    )
    assert config.learning_rate == pytest.approx(1e-3)


def test_cli_flags_override_recipe_and_python_overrides():
    (_, config, _), resolved = parse_stage_args("pretrain", "tiny/pretrain", ["--max_steps", "7"], learning_rate=0.5)
    assert config.max_steps == 7 and config.learning_rate == 0.5
    assert resolved["values"]["max_steps"] == 7


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--max_step", "7"], ["--max_step", "--max_steps"]),
        (["--max_steps", "seven"], ["command line", "max_steps", "'seven'"]),
        (["--bogus_flag"], ["--bogus_flag"]),
    ],
)
def test_bad_cli_flags(flags, words):
    with pytest.raises(UsageError) as e:
        parse_stage_args("pretrain", "tiny/pretrain", flags)
    assert "\n" not in str(e.value).strip(), "one message, on one line"
    for w in words:
        assert w in str(e.value)


def test_missing_recipe_suggests_bundled():
    with pytest.raises(UsageError, match="tiny/pretrain"):
        resolve_recipe("tiny/pretrian")


# ------------------------------------------------------------------------------------- unsetting a key: null


@pytest.mark.parametrize(
    "flags",
    [
        ["--knowledge_probe", "null"],
        ["--knowledge_probe=None"],
        ["--knowledge_probe", "~"],
        ["--knowledge_probe=NULL"],
    ],
)
def test_null_on_the_command_line_unsets_an_optional_key(flags):
    """`--key null` unsets the key as `key: null` does in a recipe (argparse alone would pass the string 'null' on,
    a dataset of that name); the other flags still parse around it."""
    (script_args, config, _), resolved = parse_stage_args(
        "pretrain", "tiny/pretrain", [*flags, "--max_train_samples", "null", "--max_steps", "3"]
    )
    assert config.knowledge_probe is None and script_args.max_train_samples is None
    assert config.max_steps == 3
    assert resolved["values"]["knowledge_probe"] is None


def test_null_unsets_a_list_key_and_a_word_in_a_list_stays():
    (_, _, model_args), _ = parse_stage_args("sft", "tiny/sft_lora", ["--lora_target_modules", "null"])
    assert model_args.lora_target_modules is None
    (_, _, model_args), _ = parse_stage_args("sft", "tiny/sft_lora", ["--lora_target_modules", "null", "q_proj"])
    assert model_args.lora_target_modules == ["null", "q_proj"]


@pytest.mark.parametrize("flags", [["--learning_rate", "null"], ["--max_steps=None"]])
def test_null_cannot_unset_a_key_that_always_has_a_value(flags):
    with pytest.raises(UsageError) as e:
        parse_stage_args("pretrain", "tiny/pretrain", flags)
    assert flags[0].split("=")[0] in str(e.value) and "cannot be unset" in str(e.value)


def test_lifecycle_set_null_unsets_a_key_like_a_stage_flag():
    from hfrecipes.lifecycles.spec import load, parse_sets

    pre_id = next(s.id for s in load("tiny/lifecycle").stages if s.stage == "pretrain")
    for word in ("null", "None"):
        life = load("tiny/lifecycle", overrides=parse_sets([f"{pre_id}.knowledge_probe={word}"]))
        pre = next(s for s in life.stages if s.id == pre_id)
        (_, config, _), _ = parse_stage_args(pre.stage, pre.recipe, **life.stage_kwargs(pre))
        assert config.knowledge_probe is None


# ------------------------------------------------------------------------------------------ ranges, choices


def test_every_range_and_choice_names_a_key_of_a_stage():
    """A misspelt key in the tables would check nothing."""
    from hfrecipes.recipe import CHOICES, RANGES, _fields
    from hfrecipes.stages import get_stage

    fields = [(k, cls) for s in STAGES for k, (cls, _, _) in _fields(get_stage(s).DATACLASSES).items()]
    assert not set(RANGES) - {k for k, _ in fields}
    for owner, key in CHOICES:  # a key several stages have (vllm_mode) is checked against each stage's class
        assert any(owner in [c.__name__ for c in cls.__mro__] for k, cls in fields if k == key), (owner, key)


# (stage, flag, value, range shown): a number outside its physical range, refused when parsed
OUT_OF_RANGE = [
    ("pretrain", "--max_steps", "-5", "[-1, inf]"),
    ("pretrain", "--seed", "-1", "[0, 4294967295]"),
    ("pretrain", "--pue", "0.5", "[1, inf]"),
    ("pretrain", "--grid_gco2_per_kwh", "-10", "[0, inf]"),
    ("sft", "--device_price_per_hour", "-2", "[0, inf]"),
    ("sft", "--device_power_watts", "0", "(0, inf]"),
    ("sft", "--gold_every", "0", "[1, inf]"),
    ("sft", "--gold_drop", "1.5", "[0, 1]"),
    ("sft", "--label_smoothing_factor", "1", "[0, 1)"),
    ("sft", "--save_total_limit", "0", "[1, inf]"),
    ("dpo", "--label_smoothing", "0.5", "[0, 0.5)"),
    ("dpo", "--loss_weights", "1", "-1", "[0, inf]"),
    ("kto", "--desirable_weight", "0", "(0, inf]"),
    ("grpo", "--top_p", "0", "(0, 1]"),
    ("grpo", "--min_p", "1.5", "[0, 1]"),
    ("grpo", "--top_k", "-1", "[0, inf]"),
    ("grpo", "--vllm_gpu_memory_utilization", "1.2", "(0, 1]"),
    ("grpo", "--epsilon", "-0.2", "(0, inf]"),
    ("grpo", "--num_iterations", "0", "[1, inf]"),
    ("ppo", "--gamma", "1.5", "[0, 1]"),
    ("ppo", "--lam", "-0.1", "[0, 1]"),
    ("ppo", "--kl_coef", "-1", "[0, inf]"),
    ("ppo", "--cliprange", "0", "(0, inf]"),
]


@pytest.mark.parametrize("row", OUT_OF_RANGE, ids=lambda r: f"{r[0]}{r[1]}={','.join(r[2:-1])}")
def test_number_outside_its_range_is_refused_naming_key_and_range(row):
    stage, flag, *values, span = row
    with pytest.raises(UsageError) as e:
        parse_stage_args(stage, f"tiny/{stage}", [flag, *values])
    message = str(e.value)
    assert f"'{flag[2:]}" in message and span in message and "\n" not in message, message


@pytest.mark.parametrize(
    "stage,key,value,words",
    [
        ("grpo", "loss_type", "gspo", ["loss_type", "'gspo'", "'dapo'"]),
        ("grpo", "importance_sampling_level", "word", ["importance_sampling_level", "'sequence'"]),
        ("dpo", "f_divergence_type", "kl", ["f_divergence_type", "'forward_kl'"]),
        ("sft", "report_to", "tensorbord", ["report_to", "'tensorboard'"]),
        ("reward", "lora_task_type", "seq_cls", ["lora_task_type", "'SEQ_CLS'"]),
    ],
)
def test_a_value_the_library_checks_only_in_training_is_refused_when_parsed(stage, key, value, words):
    with pytest.raises(UsageError) as e:
        parse_stage_args(stage, f"tiny/{stage}", **{key: value})
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_help_lists_its_keys(stage, capsys):
    """`hfrecipes <stage> --help` prints every recipe key, help texts that quote Jinja ("{% generation %}") too."""
    from hfrecipes import cli

    assert cli.main([stage, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--output_dir" in out and "--model_name_or_path" in out

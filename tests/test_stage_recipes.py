"""Every recipe in the tree parses strictly (found recursively); the SFT, reward and DPO recipes form the matrix
the docs promise (five real models x three stages x full/LoRA/QLoRA) with their launch command in the header."""

from __future__ import annotations

import pytest

from hfrecipes.api import parse_stage_args
from hfrecipes.recipe import list_recipes, recipes_root

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
TINY = ["tiny/sft", "tiny/sft_lora", "tiny/reward", "tiny/reward_lora", "tiny/dpo", "tiny/dpo_lora"]


def test_real_model_matrix_is_complete():
    missing = [name for name in MATRIX if name not in list_recipes()]
    assert not missing, f"missing recipes: {missing}"


@pytest.mark.parametrize("name", MATRIX + TINY)
def test_recipe_header_has_its_launch_command(name):
    stage = "sft" if "/sft" in name else "reward" if "/reward" in name else "dpo"
    header = [line for line in (recipes_root() / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    assert any(f"hfrecipes {stage} --config {name}" in line for line in header[:8]), header[:8]


@pytest.mark.parametrize("name", MATRIX + TINY)
def test_variant_switches(name):
    """LoRA and QLoRA are recipe switches: full has neither, LoRA has use_peft, QLoRA adds a 4-bit NF4 base."""
    stage = "sft" if "/sft" in name else "reward" if "/reward" in name else "dpo"
    (_, config, model_args), _ = parse_stage_args(stage, name)
    variant = name.rsplit("/", 1)[-1].split("_")[-1]
    assert model_args.use_peft == (variant in ("lora", "qlora"))
    assert model_args.load_in_4bit == (variant == "qlora")
    if variant == "qlora":
        assert model_args.bnb_4bit_quant_type == "nf4"
    if model_args.use_peft:
        assert model_args.lora_r > 0 and model_args.lora_alpha > 0 and model_args.lora_target_modules


def test_tiny_recipes_chain_through_runs_folders():
    parents = {"tiny/sft": "runs/tiny/pretrain", "tiny/reward": "runs/tiny/sft", "tiny/dpo": "runs/tiny/sft"}
    for name in TINY:
        stage = name.split("/")[1].split("_")[0]
        (_, config, model_args), _ = parse_stage_args(stage, name)
        assert model_args.model_name_or_path == parents[f"tiny/{stage}"]
        assert config.output_dir == f"runs/tiny/{name.split('/')[1]}"


def test_real_recipes_use_the_usual_datasets_and_safe_defaults():
    for name in MATRIX:
        stage = name.split("/")[1]
        (script_args, config, model_args), _ = parse_stage_args(stage, name)
        expected = "HuggingFaceTB/smoltalk" if stage == "sft" else "trl-lib/ultrafeedback_binarized"
        assert script_args.dataset_name == expected
        assert not model_args.trust_remote_code and not model_args.allow_pickle_weights
        assert config.learning_rate <= (2e-4 if model_args.use_peft else 5e-5)

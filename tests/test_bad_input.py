"""Bad input across the whole CLI: each case gives one clear message naming what is wrong and exit code 2, no
traceback (that needs --debug), and leaves every file the user already had as it was. Plus the safe defaults:
pickled weights refused unless allowed, remote code off unless set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hfrecipes import cli, modeling


def _tiny_model(folder: Path, vocab_size: int | None = None) -> None:
    """A one-layer model and its tokenizer, saved as a checkpoint folder (vocab_size overrides the model's)."""

    texts = [f"{a} plus {b} is {a + b}." for a in range(30) for b in range(30)]
    tok = modeling.train_tiny_tokenizer(texts, vocab_size=300, model_max_length=64)
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = modeling.config_from("tiny", {**dims, "num_key_value_heads": 1}, tok)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    modeling.init_model(config, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """What a user already has: models, data, recipes, a finished stage, a folder of their own."""
    import torch

    root = tmp_path_factory.mktemp("user")
    _tiny_model(root / "model")
    _tiny_model(root / "mismatch", vocab_size=64)
    _tiny_model(root / "pickled")
    from safetensors.torch import load_file

    weights = load_file(root / "pickled" / "model.safetensors")
    torch.save(weights, root / "pickled" / "pytorch_model.bin")
    (root / "pickled" / "model.safetensors").unlink()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes\n")
    (root / "finished").mkdir()
    (root / "finished" / "record.json").write_text(json.dumps({"stage": "sft", "status": "complete"}))
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "wrong_columns.jsonl").write_text('{"question": "hi", "reply": "hello"}\n')
    (root / "empty.jsonl").write_text("")
    recipes = {
        "unknown_key": "dataset_name: tiny:corpus\nlearning_rat: 0.1\n",
        "bad_type": "dataset_name: tiny:corpus\nmax_steps: ten\n",
        "bad_yaml": "dataset_name: [tiny:corpus\n",
        "a_list": "- a\n- b\n",
        "hub_token": "dataset_name: tiny:corpus\nhub_token: hf_secret\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


PRE = ["pretrain", "--config", "tiny/pretrain", "--output_dir", "{out}"]
SFT = ["sft", "--config", "tiny/sft", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]
DPO = ["dpo", "--config", "tiny/dpo", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]
GRPO = ["grpo", "--config", "tiny/grpo", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]

CASES = {
    # recipes and flags
    "no_config": (["pretrain"], ["needs --config"]),
    "recipe_not_found": (["sft", "--config", "tiny/nope"], ["tiny/nope", "not found"]),
    "unknown_recipe_key": (["pretrain", "--config", "{user}/unknown_key.yaml"], ["learning_rat", "learning_rate"]),
    "wrong_value_type": (["pretrain", "--config", "{user}/bad_type.yaml"], ["max_steps", "'ten'"]),
    "invalid_yaml": (["pretrain", "--config", "{user}/bad_yaml.yaml"], ["not valid YAML"]),
    "recipe_not_a_mapping": (["pretrain", "--config", "{user}/a_list.yaml"], ["mapping", "list"]),
    "hub_token_in_recipe": (["pretrain", "--config", "{user}/hub_token.yaml"], ["hub_token", "HF_TOKEN"]),
    "unknown_flag": ([*PRE, "--learning_rat", "0.1"], ["--learning_rat", "learning_rate"]),
    "bad_flag_value": ([*PRE, "--max_steps", "ten"], ["max_steps"]),
    # out-of-range hyperparameters
    "negative_learning_rate": ([*PRE, "--learning_rate=-1e-3"], ["learning_rate", "-0.001"]),
    "zero_batch_size": ([*PRE, "--per_device_train_batch_size", "0"], ["per_device_train_batch_size"]),
    "zero_grad_accumulation": ([*PRE, "--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps"]),
    "warmup_ratio_above_one": ([*PRE, "--warmup_ratio", "1.5"], ["warmup_ratio"]),
    "negative_weight_decay": ([*PRE, "--weight_decay=-0.1"], ["weight_decay"]),
    "block_size_one": ([*PRE, "--block_size", "1"], ["block_size"]),
    "zero_save_steps": ([*PRE, "--save_steps", "0"], ["save_steps"]),
    "lora_rank_zero": ([*SFT, "--use_peft", "true", "--lora_r", "0"], ["lora_r"]),
    "lora_dropout_one": ([*SFT, "--use_peft", "true", "--lora_dropout", "1.0"], ["lora_dropout"]),
    "zero_max_length": ([*SFT, "--max_length", "0"], ["max_length"]),
    "negative_dpo_beta": ([*DPO, "--beta=-0.1"], ["beta"]),
    "one_generation": ([*GRPO, "--num_generations", "1"], ["num_generations"]),
    "generations_do_not_divide_batch": ([*GRPO, "--num_generations", "3"], ["num_generations"]),
    "zero_temperature": ([*GRPO, "--temperature", "0"], ["temperature"]),
    "unknown_reward_function": ([*GRPO, "--reward_funcs", "nosuch"], ["nosuch"]),
    # datasets
    "unknown_tiny_dataset": ([*PRE, "--dataset_name", "tiny:nothing"], ["tiny:nothing"]),
    "dataset_file_missing": ([*SFT, "--dataset_name", "./missing.jsonl"], ["missing.jsonl", "does not exist"]),
    "dataset_wrong_columns": ([*SFT, "--dataset_name", "{user}/wrong_columns.jsonl"], ["wrong_columns.jsonl"]),
    "dataset_empty": ([*SFT, "--dataset_name", "{user}/empty.jsonl"], ["empty"]),
    "preference_stage_on_plain_text": ([*DPO, "--dataset_name", "tiny:corpus"], ["chosen"]),
    "bad_knowledge_cutoff": ([*PRE, "--knowledge_cutoff", "lastspring"], ["knowledge_cutoff"]),
    # paths and folders
    "output_dir_is_a_file": ([*PRE[:-1], "{user}/a_file.txt"], ["is a file"]),
    "output_dir_holds_user_files": ([*PRE[:-1], "{user}/mine"], ["holds other files"]),
    "output_dir_holds_a_finished_stage": ([*SFT[:-1], "{user}/finished"], ["finished stage"]),
    "model_path_missing": ([*SFT[:3], "--model_name_or_path", "./nope", "--output_dir", "{out}"], ["./nope"]),
    "lifecycle_recipe_missing": (["lifecycle", "tiny/nope"], ["tiny/nope"]),
    "accelerate_config_missing": (["launch", "zero9", "--", "sft", "--config", "tiny/sft"], ["zero9"]),
    # models and tokenizers
    "pickled_weights": (
        [*SFT[:3], "--model_name_or_path", "{user}/pickled", "--output_dir", "{out}"],
        ["allow_pickle_weights"],
    ),
    "tokenizer_larger_than_model": (
        [*SFT[:3], "--model_name_or_path", "{user}/mismatch", "--output_dir", "{out}"],
        ["vocab_size", "64"],
    ),
    "quantized_without_adapters": ([*SFT, "--load_in_4bit", "true"], ["use_peft"]),
    "lm_head_adapter": ([*SFT, "--use_peft", "true", "--lora_target_modules", "q_proj", "lm_head"], ["lm_head"]),
    # devices
    "bf16_without_a_gpu": ([*PRE, "--bf16", "true"], ["bf16", "GPU"]),
    "fp16_without_a_gpu": ([*SFT, "--fp16", "true"], ["fp16", "GPU"]),
}


def test_the_table_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, user, tmp_path, capsys):
    argv, words = CASES[name]
    if name.endswith("without_a_gpu") and modeling.has_accelerator():
        pytest.skip("this machine has a GPU")
    argv = [a.format(user=user, out=tmp_path / "out") for a in argv]
    before = _digest(user)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("hfrecipes: error:") == 1, err
    message = err[err.index("hfrecipes: error:") :]
    assert message.count("\n") == 1, err  # one message, on one line
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert _digest(user) == before, "a file the user had was changed"


def test_debug_shows_the_traceback(user):
    from hfrecipes.errors import UsageError

    with pytest.raises(UsageError, match="learning_rate"):
        cli.main(["--debug", "pretrain", "--config", "tiny/pretrain", "--learning_rate=-1"])


def test_remote_code_is_off_unless_the_recipe_sets_it():
    from hfrecipes.api import parse_stage_args

    for stage, recipe in [("pretrain", "tiny/pretrain"), ("sft", "tiny/sft"), ("dpo", "tiny/dpo")]:
        (_, _, model_args), _ = parse_stage_args(stage, recipe)
        assert model_args.trust_remote_code is False
        assert model_args.allow_pickle_weights is False
    (_, _, model_args), _ = parse_stage_args("sft", "tiny/sft", trust_remote_code=True)
    assert model_args.trust_remote_code is True


def test_pickled_weights_load_when_allowed(user):
    from hfrecipes.api import parse_stage_args

    (_, _, model_args), _ = parse_stage_args(
        "sft", "tiny/sft", model_name_or_path=str(user / "pickled"), allow_pickle_weights=True
    )
    model = modeling.load_pretrained(model_args)
    assert model.config.vocab_size > 64
